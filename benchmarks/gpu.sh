#!/usr/bin/env bash
# Every GPU measurement of benchmarks/ in one go, sized for a few minutes of one borrowed H100 or H200.
#   bash benchmarks/gpu.sh [LOG_DIR]
# Results go to LOG_DIR/RESULTS.md (merge them into benchmarks/RESULTS.md) with one log per step.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-benchmarks/gpu_logs}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$LOG/gpu.txt"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$LOG/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: run one measurement with a time limit, keep going if it fails
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" > "$LOG/$name.log" 2>&1
  echo "exit $? after step $name"; tail -n 8 "$LOG/$name.log"
}

# 1. Harness overhead on nanoGPT's shakespeare_char model (model=small, batch 64 x 256), compiled, bf16:
#    Lightning against a plain loop; also the steady-state throughput on that configuration.
step harness_small 90 python3 benchmarks/throughput.py --device cuda --model small --batch-size 64 --compile \
  --steps 100 --warmup 25 --reps 3 --variants plain,lightning --results "$LOG/RESULTS.md"
# 2. The lesson's MiniGPT: our step compiled with CUDA graphs against the lesson's loop (target 3x). Compiled
#    without CUDA graphs it ran at the lesson's speed on an H200 (RESULTS.md), so that variant is not repeated.
#    Such a small model's step is bound by the host: the plain loop with the same CUDA graphs, and where each
#    step's host time goes (--host-profile), say how much of the step is Lightning's and how much the rest's.
step lesson_seed_graphs 75 python3 benchmarks/throughput.py --device cuda --model seed --batch-size 32 --compile \
  --compile-mode reduce-overhead --steps 150 --warmup 30 --reps 2 --variants plain,lightning,lesson --host-profile \
  --results "$LOG/RESULTS.md"
# 3. The speed run, for each way of compiling: cold (an empty compile cache of its own), then warm. Each run logs
#    its start-up (imports, data and model, trainer set-up, first step with compilation), which RESULTS.md gets.
speedrun() {  # speedrun NAME LIMIT CACHE OVERRIDES...
  local name=$1 limit=$2 cache=$3; shift 3
  step "$name" "$limit" env TORCHINDUCTOR_CACHE_DIR="/tmp/inductor_$cache" TRITON_CACHE_DIR="/tmp/inductor_$cache/triton" \
    python3 benchmarks/time_to_quality.py \
    --device cuda --target 1.48 --timeout $((limit - 5)) --results "$LOG/RESULTS.md" experiment=speedrun "$@"
}
speedrun speedrun_full_cold 110 full
speedrun speedrun_full_warm 70 full
speedrun speedrun_regional_cold 85 regional compile=regional
speedrun speedrun_regional_warm 60 regional compile=regional
# 4. The levers that won the CPU speed run (experiment=speedrun_cpu), not yet measured on a GPU: Muon for the block
#    matrices (its Newton-Schulz iteration runs in bf16 there) and rotary positions (a new block graph: compiles).
speedrun speedrun_muon_rope 70 regional compile=regional optimizer=muon optimizer.lr=0.02 optimizer.adamw_lr=3e-3 \
  model.rope=true
echo "=== done ($(date +%T))"

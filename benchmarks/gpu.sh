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

# 0. The lesson's recipe (python train.py, 5000 steps) in fp32 with the CPU's windows, and variants of its
#    optimizer settings, in parallel on the GPU: which settings reach the lowest val/loss at step 5000.
echo "=== recipe_grid ($(date +%T))"
grid=("" "optimizer.betas=[0.9,0.99]" "optimizer.betas=[0.9,0.99] optimizer.weight_decay=0.0"
      "scheduler.min_lr_ratio=0.0" "scheduler=constant" "optimizer.betas=[0.9,0.99] scheduler.warmup_steps=200")
for i in "${!grid[@]}"; do
  timeout 100 python3 train.py trainer=gpu trainer.precision=32-true data.tokens_on_gpu=false \
    ~callbacks.progress_bar ~callbacks.early_stopping ${grid[$i]} hydra.run.dir=outputs/grid/$i > "$LOG/grid_$i.txt" 2>&1 &
done
wait
for i in "${!grid[@]}"; do echo "grid $i [${grid[$i]}]: $(grep -a 'step [0-9]*: ' "$LOG/grid_$i.txt" | tail -n 3 | sed 's/.*step/step/' | tr '\n' ' ')"; done | tee "$LOG/grid.log"
rm -f "$LOG"/grid_*.txt

# 1. Harness overhead on nanoGPT's shakespeare_char model (model=small, batch 64 x 256), compiled, bf16:
#    Lightning against a plain loop; also the steady-state throughput on that configuration.
step harness_small 100 python3 benchmarks/throughput.py --device cuda --model small --batch-size 64 --compile \
  --steps 100 --warmup 25 --reps 3 --variants plain,lightning --results "$LOG/RESULTS.md"
# 2. The lesson's MiniGPT: our step (compiled with CUDA graphs) against the lesson's loop.
step lesson_seed 100 python3 benchmarks/throughput.py --device cuda --model seed --batch-size 32 --compile \
  --compile-mode reduce-overhead --steps 200 --warmup 30 --reps 3 --results "$LOG/RESULTS.md"
# 3. The speed run, cold (empty compile cache) and then warm.
step speedrun_cold 120 python3 benchmarks/time_to_quality.py --device cuda --target 1.48 --timeout 110 \
  --results "$LOG/RESULTS.md" experiment=speedrun
step speedrun_warm 90 python3 benchmarks/time_to_quality.py --device cuda --target 1.48 --timeout 80 \
  --results "$LOG/RESULTS.md" experiment=speedrun
# 4. Alternatives to the speed run's batch and learning rate, warm-ish (same model; new shapes compile once).
step speedrun_b256 75 python3 benchmarks/time_to_quality.py --device cuda --target 1.48 --timeout 80 \
  --results "$LOG/RESULTS.md" experiment=speedrun data.batch_size=256 optimizer.lr=3e-3 model.dropout=0.1 trainer.max_steps=500 trainer.val_check_interval=50
echo "=== done ($(date +%T))"

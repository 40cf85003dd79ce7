#!/usr/bin/env bash
# Every GPU measurement of issue 19's table in one go, about 6 minutes of one borrowed H100 or H200:
#   bash benchmarks/gpu.sh [LOG_DIR]
# All results go to LOG_DIR/RESULTS.md (merge them into benchmarks/RESULTS.md), with one log per step beside it. A
# failing step is reported (its exit status and last lines) and the script goes on. Without network, the text must
# be at $MINIGPT_CACHE_DIR/tinyshakespeare/input.txt (the default cache folder otherwise: ~/.cache/minigpt).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-benchmarks/gpu_logs}
mkdir -p "$LOG"
RESULTS="$LOG/RESULTS.md"
export PYTHONUNBUFFERED=1

# ---- dependencies: torch and lightning come with the machine; the rest (hydra-core, omegaconf, torchviz...) may not.
# >>> EDIT THIS ONE LINE for a machine without network, e.g. PIP_NO_INDEX=1 PIP_FIND_LINKS=/path/to/wheels pip ...
python3 -c "import hydra, omegaconf, torchviz, graphviz, tensorboard, matplotlib" 2>/dev/null || pip install -q -e .
# <<<

step() {  # step NAME SECONDS COMMAND...: run one measurement with a time limit, keep going if it fails
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" > "$LOG/$name.log" 2>&1
  local status=$?
  echo "exit $status after step $name"; tail -n 8 "$LOG/$name.log"
  [ "$status" = 0 ] || printf '\n## FAILED: %s (exit %s)\n\n```\n%s\n```\n' "$name" "$status" "$(tail -n 15 "$LOG/$name.log")" >> "$RESULTS"
}
record() {  # record TITLE COMMAND...: the command's output as a section of the results file
  local title=$1; shift
  { printf '\n## %s\n\n```\n' "$title"; "$@" 2>&1 | tail -n 40; printf '```\n'; } >> "$RESULTS"
}

record "Machine ($(date -u '+%F %H:%M UTC'))" bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
  --format=csv; python3 -c \"import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)\""
# Start-up: the imports of train.py, the largest part of the time before the first step (issue: 11.4 s on an H200).
record "Import time of train.py (python -X importtime; the slowest top-level modules, microseconds)" bash -c \
  "python3 -X importtime -c 'import train' 2>&1 | sort -t'|' -k2 -n | tail -n 12"

# 1. Harness overhead on nanoGPT's shakespeare_char model (model=small, batch 64 x 256), compiled, bf16: Lightning
#    against a plain loop (target >= 0.95 and >= 2.2 M tokens/s).
step harness_small 75 python3 benchmarks/throughput.py --device cuda --model small --batch-size 64 --compile \
  --steps 100 --warmup 25 --reps 2 --variants plain,lightning --results "$RESULTS"
# 2. The lesson's MiniGPT with CUDA graphs (compile_mode=reduce-overhead; it crashed before issue 19): our Lightning
#    step and the plain loop against the lesson's loop (target 3x), and where each step's host time goes.
step lesson_seed_graphs 75 python3 benchmarks/throughput.py --device cuda --model seed --batch-size 32 --compile \
  --compile-mode reduce-overhead --steps 100 --warmup 20 --reps 2 --variants plain,lightning,lesson --host-profile \
  --results "$RESULTS"
# 3. Lightning's added host time per step, on this machine's (quiet) CPU: the tiny model is all fixed cost (target
#    <= 0.4 ms over the plain loop). One thread, as the GPU runs use one Python thread.
step host_overhead_cpu 45 env OMP_NUM_THREADS=1 python3 benchmarks/throughput.py --model tiny --batch-size 1 \
  --steps 300 --warmup 20 --reps 3 --variants plain,lightning --results "$RESULTS"
# 4. The speed run: launch to val/loss <= 1.48, cold (an empty compile cache of its own), then warm (target 20 s
#    warm, 28 s cold). Each run logs its start-up (imports, data and model, trainer set-up, first step).
speedrun() {  # speedrun NAME LIMIT CACHE TARGET OVERRIDES...
  local name=$1 limit=$2 cache=$3 target=$4; shift 4
  step "$name" "$limit" env TORCHINDUCTOR_CACHE_DIR="/tmp/inductor_$cache" TRITON_CACHE_DIR="/tmp/inductor_$cache/triton" \
    python3 benchmarks/time_to_quality.py --device cuda --target "$target" --timeout $((limit - 5)) \
    --results "$RESULTS" "$@"
}
rm -rf /tmp/inductor_speedrun
speedrun speedrun_cold 50 speedrun 1.48 experiment=speedrun
speedrun speedrun_warm 40 speedrun 1.48 experiment=speedrun
# 5. The lowest val/loss within a minute of launch (target <= 1.43; its validations are in the results), warm: the
#    speed run's model with more dropout, a new graph, compiled once first by a two-step run (not on the clock).
step speedrun_best_compile 60 env TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_speedrun \
  TRITON_CACHE_DIR=/tmp/inductor_speedrun/triton python3 train.py experiment=speedrun_best trainer.max_steps=2 \
  trainer.val_check_interval=2 data.val_batches=1 logger=none "~callbacks.model_checkpoint" \
  hydra.run.dir="$LOG/speedrun_best_compile"
speedrun speedrun_best 70 speedrun 1.40 experiment=speedrun_best
# 6. The default recipe (the lesson's model) with every callback on, compiled, on the GPU: attention maps, samples,
#    gradient health, the graph and the loss curve, then sampling from its checkpoint. Then CUDA graphs through a
#    whole run: training, validation, samples, checkpoints and sample.py.
step recipe 60 python3 train.py trainer=gpu compile=true trainer.max_steps=200 trainer.val_check_interval=100 \
  hydra.run.dir="$LOG/recipe"
step recipe_graphs 60 python3 train.py trainer=gpu compile=true compile_mode=reduce-overhead trainer.max_steps=100 \
  trainer.val_check_interval=50 hydra.run.dir="$LOG/recipe_graphs"
step recipe_graphs_sample 30 python3 sample.py ckpt_path="$LOG/recipe_graphs" max_new_tokens=100
record "The default recipe's run folder, train.log's last lines, and a sample (compile_mode=reduce-overhead)" bash -c \
  "ls $LOG/recipe; tail -n 6 $LOG/recipe/train.log; tail -n 4 $LOG/recipe_graphs/train.log; \
  tail -n 12 $LOG/recipe_graphs_sample.log"
printf '\ngpu.sh took %d s.\n' "$SECONDS" >> "$RESULTS"
echo "=== done ($(date +%T)) after $SECONDS s: $RESULTS"

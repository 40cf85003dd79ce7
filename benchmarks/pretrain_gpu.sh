#!/usr/bin/env bash
# experiment=pretrain on one GPU, sized for about 3 minutes of a borrowed H100 or H200; gpu.sh can call it with its
# log folder (bash benchmarks/pretrain_gpu.sh "$LOG"). Needs TinyShakespeare in $MINIGPT_CACHE_DIR (or ~/.cache).
#   bash benchmarks/pretrain_gpu.sh [LOG_DIR]
# Results go to LOG_DIR/RESULTS.md (merge them into benchmarks/RESULTS.md), with one log per step.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-benchmarks/gpu_logs}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run one measurement with a time limit, keep going if it fails
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" > "$LOG/$name.log" 2>&1
  echo "exit $? after step $name"; tail -n 8 "$LOG/$name.log"
}

# 1. Tokens/s and MFU of GPT-2 124M-class (bf16, compiled, fused AdamW, 2 x 16 x 1024 tokens per step) through
#    Lightning as train.py runs it, and in a plain loop: 10 untimed + 100 timed steps each, about 2 minutes with both
#    compilations. The Lightning row's tokens/s goes into docs/pretraining.md's 1B-token plan.
step pretrain_throughput 200 python3 benchmarks/pretrain.py --device cuda --results "$LOG/RESULTS.md"
# 2. trainer=fsdp on this GPU: trains 2 steps, checkpoints, resumes to 4 (tests/test_pretrain.py; under a minute)
step pretrain_fsdp 120 python3 -m pytest -q -p no:cacheprovider tests/test_pretrain.py -k fsdp -rs
echo "=== done ($(date +%T))"

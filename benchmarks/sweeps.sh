#!/usr/bin/env bash
# The experiments behind RESULTS.md. Each line is one resumable `cpl-masks sweep`: re-running this
# script skips finished runs. Usage: benchmarks/sweeps.sh OUT_DIR QUEUE   (QUEUE: demo | others | seeds)
# Run the queues in parallel on a 2-core machine, one thread each.
set -euo pipefail
OUT=${1:?output folder}; QUEUE=${2:?queue}
CPL="${CPL:-.venv/bin/cpl-masks}"
DATA=../shared/data
COMMON=(--threads 1 --scoring loglik --holdout-fraction 0.25 --forgetting-budget 0.02)

case "$QUEUE" in
demo)  # SmolLM2-135M-Instruct on the built-in demo set: every method, three learning rates
  $CPL sweep --data builtin:demo --limit 96 --epochs 1 --lr-grid 1e-4,3e-4,1e-3 \
    --method-lr-grid lora=3e-3,1e-2,3e-2 --ewc-lambda 0.3 --replay-share 0.3 "${COMMON[@]}" \
    --out "$OUT/smollm2-demo"
  ;;
others)
  until [ -f "$OUT/smollm2-demo/masks/cpl.safetensors" ]; do sleep 20; done
  # CommonsenseQA sample: own mask, controls, and the demo's mask reused (cross-task)
  $CPL sweep --data $DATA/csqa.jsonl --limit 96 --epochs 1 --lr-grid 3e-4,1e-3 \
    --methods "full,mask,random,gradient-magnitude,reuse:$OUT/smollm2-demo/masks/cpl.safetensors" \
    "${COMMON[@]}" --out "$OUT/smollm2-csqa"
  # Gemma 3 270M (base model, second architecture) on the demo set
  $CPL sweep --model gemma3-270m --data builtin:demo --limit 96 --epochs 1 --lr-grid 3e-4,1e-3 \
    --methods full,mask,random "${COMMON[@]}" --out "$OUT/gemma3-demo"
  # MMLU sample
  $CPL sweep --data $DATA/mmlu.jsonl --limit 64 --epochs 1 --lr-grid 3e-4,1e-3 \
    --methods full,mask,random "${COMMON[@]}" --out "$OUT/smollm2-mmlu"
  ;;
seeds)  # the headline rows with three seeds (example order and random mask)
  $CPL sweep --data builtin:demo --limit 96 --epochs 1 --lr-grid "${LR:-1e-3}" --seeds 0,1,2 \
    --methods full,mask,random "${COMMON[@]}" --out "$OUT/smollm2-demo-seeds"
  ;;
*) echo "unknown queue $QUEUE" >&2; exit 2 ;;
esac

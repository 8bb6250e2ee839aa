#!/usr/bin/env bash
# The static CPL mask re-profiled once an epoch (issue 15's refreshed mask), at more seeds, on a paper
# queue's split, mask and settings: K = 1000 exceeds an epoch's 61 steps, so the mask is cut again at the
# start of every epoch after the first. Read against the queue's runs of the same seed (full, mask).
# Usage: SEEDS="0 1 2" benchmarks/reprofiled.sh OUT paper|paper-gemma (after benchmarks/sweeps.sh OUT QUEUE)
set -euo pipefail
OUT=${1:?output folder}; QUEUE=${2:?paper or paper-gemma}; CPL="${CPL:-.venv/bin/cpl-masks}"
S="$OUT/$QUEUE"; RUNS="$OUT/$QUEUE-extra"  # beside the queue's other single runs (paper-extra: the seed-0 run)
case $QUEUE in
  paper) SETTINGS=(--epochs 12 --lr 3e-5) ;;
  paper-gemma) SETTINGS=(--model gemma3-270m --epochs 8 --lr 1e-5) ;;
  *) echo "unknown queue: $QUEUE (paper or paper-gemma)" >&2; exit 2 ;;
esac
TRAIN=("${SETTINGS[@]}" --eval-every 2 --optimizer sgd --batch-size 1 --scoring loglik --task demo --threads 1
  --data "$S/split/inject.jsonl" --mastered "$S/split/mastered.jsonl" --heldout "$S/split/mastered_heldout.jsonl"
  --retain-text "$S/retain.txt")
source "$(dirname "$0")/queue_run.sh"
for SEED in ${SEEDS:-0 1 2}; do
  run mask-reprofiled-s$SEED --mask "$S/masks/cpl.safetensors" --reprofile-every 1000 --seed $SEED
done

#!/usr/bin/env bash
# The static CPL mask re-profiled once an epoch (issue 15's refreshed mask), at more seeds, on a paper
# queue's split, mask and settings: K = 1000 exceeds an epoch's 61 steps, so the mask is cut again at the
# start of every epoch after the first. Read against the queue's runs of the same seed (full, mask).
# Usage: SEEDS="0 1 2" benchmarks/reprofiled.sh OUT paper|paper-gemma (after benchmarks/sweeps.sh OUT QUEUE)
set -euo pipefail
OUT=${1:?output folder}; QUEUE=${2:?paper or paper-gemma}; CPL="${CPL:-.venv/bin/cpl-masks}"
source "$(dirname "$0")/paper_queue.sh"
for SEED in ${SEEDS:-0 1 2}; do
  run mask-reprofiled-s$SEED --mask "$S/masks/cpl.safetensors" --reprofile-every 1000 --seed $SEED
done

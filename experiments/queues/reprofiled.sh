#!/usr/bin/env bash
# The static CPL mask re-profiled once an epoch (issue 15's refreshed mask), at more seeds, on a paper
# queue's split, mask and settings: K = 1000 exceeds an epoch's 61 steps, so the mask is cut again at the
# start of every epoch after the first. Read against the queue's runs of the same seed (full, mask).
# Settings: experiments/configs/reprofiled.toml (seeds 0 1 2 unless SEEDS is given).
# Usage: SEEDS="0 1 2" experiments/queues/reprofiled.sh OUT paper|paper-gemma (after experiments/queues/sweeps.sh OUT QUEUE)
set -euo pipefail
OUT=${1:?output folder}; QUEUE=${2:?paper or paper-gemma}
source "$(dirname "$0")/paper_queue.sh"
settings reprofiled seeds
for SEED in ${SEEDS:-${ARGS[*]}}; do
  run_all reprofiled runs out="$OUT" queue="$QUEUE" seed="$SEED"
done

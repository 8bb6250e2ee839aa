#!/usr/bin/env bash
# Protection against the cost of refreshing g_M (issue 15): the per-step rule on a paper queue's split and
# settings at seed SEED, from never refreshing (sign(g_M) at the base weights, stored as a retain set of M and
# steering to the end: 0 passes over M an epoch) through each epoch's refresh over N questions of M drawn
# afresh (SAMPLES, default "16 35": N/|M| of a pass). The other end is the queue's own dynamic run (all of M
# once an epoch); paper-extra's sample-8 run is another point. Tables: experiments/analysis/refresh_cost.py.
# Settings: experiments/configs/refresh-cost.toml (SEED and SAMPLES, when given, replace its seed and samples).
# Usage: [SEED=0] [SAMPLES="16 35"] experiments/queues/refresh_cost.sh OUT [paper|paper-gemma]
set -euo pipefail
OUT=${1:?output folder}; QUEUE=${2:-paper}
source "$(dirname "$0")/paper_queue.sh"
export CPL_MASKS_HOME="$RUNS/home"  # its own registry
settings refresh-cost seed; SEED=${SEED:-${ARGS[0]}}
settings refresh-cost samples; SAMPLES=${SAMPLES-${ARGS[*]}}
settings refresh-cost retain out="$OUT" queue="$QUEUE"
[ -f "$RUNS/mastered-retain.safetensors" ] || $CPL profile "${MODEL[@]}" "${ARGS[@]}"
run_all refresh-cost runs out="$OUT" queue="$QUEUE" seed="$SEED"
for N in $SAMPLES; do
  run_all refresh-cost sample-runs out="$OUT" queue="$QUEUE" seed="$SEED" n="$N"
done

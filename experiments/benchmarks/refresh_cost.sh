#!/usr/bin/env bash
# Protection against the cost of refreshing g_M (issue 15): the per-step rule on a paper queue's split and
# settings at seed SEED, from never refreshing (sign(g_M) at the base weights, stored as a retain set of M and
# steering to the end: 0 passes over M an epoch) through each epoch's refresh over N questions of M drawn
# afresh (SAMPLES, default "16 35": N/|M| of a pass). The other end is the queue's own dynamic run (all of M
# once an epoch); paper-extra's sample-8 run is another point. Tables: benchmarks/refresh_cost.py.
# Usage: [SEED=0] [SAMPLES="16 35"] benchmarks/refresh_cost.sh OUT [paper|paper-gemma]
set -euo pipefail
OUT=${1:?output folder}; QUEUE=${2:-paper}; CPL="${CPL:-.venv/bin/cpl-masks}"; SEED=${SEED:-0}
source "$(dirname "$0")/paper_queue.sh"
export CPL_MASKS_HOME="$RUNS/home"  # its own registry
RETAIN="$RUNS/mastered-retain.safetensors"
[ -f "$RETAIN" ] || $CPL profile "${MODEL[@]}" --kind retain --mastered "$S/split/mastered.jsonl" \
  --scoring loglik --name "$QUEUE-mastered" --threads 1 --out "$RETAIN"
run dynamic-never-s$SEED --retain "$RETAIN" --refresh-every 0 --seed "$SEED"
for N in ${SAMPLES-16 35}; do
  run dynamic-sample$N-s$SEED --mode dynamic --refresh-sample $N --seed "$SEED"
done

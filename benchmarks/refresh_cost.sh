#!/usr/bin/env bash
# Protection against the cost of refreshing g_M (issue 15): the per-step rule on the paper queue's split and
# settings (SmolLM2, seed SEED), from never refreshing (sign(g_M) at the base weights, stored as a retain set of
# M, steering to the end: 0 passes over M an epoch) through each epoch's refresh over N questions of M drawn
# afresh (N/69 of a pass). The ends are the paper queue's own dynamic run (all of M once an epoch) and the
# never-refreshing run; paper-extra's sample-8 run is a point between. Usage: benchmarks/refresh_cost.sh OUT
set -euo pipefail
OUT=${1:?output folder}; CPL="${CPL:-.venv/bin/cpl-masks}"; SEED=${SEED:-0}
S="$OUT/paper"; RUNS="$OUT/paper-extra"
export CPL_MASKS_HOME="$RUNS/home"
TRAIN=(--epochs 12 --lr 3e-5 --eval-every 2 --optimizer sgd --batch-size 1 --scoring loglik --task demo --threads 1
  --data "$S/split/inject.jsonl" --mastered "$S/split/mastered.jsonl" --heldout "$S/split/mastered_heldout.jsonl"
  --retain-text "$S/retain.txt" --seed "$SEED")
source "$(dirname "$0")/queue_run.sh"
RETAIN="$RUNS/mastered-retain.safetensors"
[ -f "$RETAIN" ] || $CPL profile --kind retain --mastered "$S/split/mastered.jsonl" --scoring loglik \
  --name paper-mastered --threads 1 --out "$RETAIN"
run dynamic-never-s$SEED --retain "$RETAIN" --refresh-every 0
for N in 16 35; do
  run dynamic-sample$N-s$SEED --mode dynamic --refresh-sample $N
done

#!/usr/bin/env bash
# The retain experiment again with the choices objective (g_M of the cross-entropy over the choices, the
# prediction's margin, instead of the correct answer's own loss): task A, seed 0, 6 epochs, the same
# settings as the retain queue of benchmarks/sweeps.sh. Usage: benchmarks/retain_choices.sh OUT
set -euo pipefail
OUT=${1:?output folder}; CPL="${CPL:-.venv/bin/cpl-masks}"
SPLIT="$OUT/paper/split"; R="$OUT/retain"
export CPL_MASKS_HOME="$R/home"
for SET in pool-128 mmlu-128; do
  [ -f "$R/$SET-choices.safetensors" ] || $CPL profile --kind retain --objective choices \
    --mastered "$R/$SET.jsonl" --scoring loglik --name "paper-$SET-choices" --threads 1 \
    --out "$R/$SET-choices.safetensors"
done
TRAIN=(--epochs 6 --eval-every 2 --lr 3e-5 --optimizer sgd --batch-size 1 --scoring loglik --threads 1
  --heldout "$SPLIT/mastered_heldout.jsonl")
source "$(dirname "$0")/queue_run.sh"
A=(--data "$SPLIT/inject.jsonl" --mastered "$SPLIT/mastered.jsonl")
run a-retain-pool128-choices "${A[@]}" --retain "$R/pool-128-choices.safetensors"
run a-dynamic-choices "${A[@]}" --mode dynamic --objective choices
B=(--data "$R/task-b/inject.jsonl" --mastered "$R/task-b/mastered.jsonl")
run b-retain-pool128-choices "${B[@]}" --retain "$R/pool-128-choices.safetensors"
run a-retain-mmlu128-choices "${A[@]}" --retain "$R/mmlu-128-choices.safetensors"
# task B's epochs are 141 steps: the same retain set refreshed every 30 steps, against the staleness of once an epoch
run b-retain-pool128-choices-r30 "${B[@]}" --retain "$R/pool-128-choices.safetensors" --refresh-every 30
# the per-step rule's control: the same rule steered by random signs, redrawn each epoch (task A, same schedule)
run a-random-signs "${A[@]}" --mode random-signs
# confident signs (issue 15): a sign of g_M counts only where |g_M| > 2 standard errors over the 128 questions;
# an uncertain entry moved by every step (pass) or by none (freeze). Task A, the same schedule.
for UNCERTAIN in pass freeze; do
  [ -f "$R/pool-128-choices-c2-$UNCERTAIN.safetensors" ] || $CPL profile --kind retain --objective choices \
    --confidence 2 --uncertain $UNCERTAIN --mastered "$R/pool-128.jsonl" --scoring loglik \
    --name "paper-pool-128-choices-c2-$UNCERTAIN" --threads 1 --out "$R/pool-128-choices-c2-$UNCERTAIN.safetensors"
  run a-retain-pool128-choices-c2-$UNCERTAIN "${A[@]}" --retain "$R/pool-128-choices-c2-$UNCERTAIN.safetensors"
done
# more seeds of task A's decisive pair (issue 15: ≥ 3 seeds), read against the paper queue's runs of the same seed:
# SEEDS="1 2" benchmarks/retain_choices.sh OUT
for SEED in ${SEEDS:-}; do
  run a-retain-pool128-choices-s$SEED "${A[@]}" --retain "$R/pool-128-choices.safetensors" --seed $SEED
  run a-random-signs-s$SEED "${A[@]}" --mode random-signs --seed $SEED
done

#!/usr/bin/env bash
# The retain experiment again with the choices objective (g_M of the cross-entropy over the choices, the
# prediction's margin, instead of the correct answer's own loss): task A, seed 0, 6 epochs, the same
# settings as the retain queue of experiments/queues/sweeps.sh. Settings: experiments/configs/retain-choices.toml
# (and retain.toml's [train]). Usage: [SEEDS="1 2"] experiments/queues/retain_choices.sh OUT
set -euo pipefail
OUT=${1:?output folder}
source "$(dirname "$0")/settings.sh"
R="$OUT/retain"
export CPL_MASKS_HOME="$R/home"
settings retain-choices sets
for SET in "${ARGS[@]}"; do
  settings retain-choices profile out="$OUT" set="$SET"
  [ -f "$R/$SET-choices.safetensors" ] || $CPL profile "${ARGS[@]}"
done
settings retain train out="$OUT"; TRAIN=("${ARGS[@]}")
source "$(dirname "$0")/queue_run.sh"
run_all retain-choices runs out="$OUT"
# confident signs (issue 15): a sign of g_M counts only where |g_M| > 2 standard errors over the 128 questions;
# an uncertain entry moved by every step (pass) or by none (freeze). Task A, the same schedule.
settings retain-choices uncertain
for UNCERTAIN in "${ARGS[@]}"; do
  settings retain-choices confident-profile out="$OUT" uncertain="$UNCERTAIN"
  [ -f "$R/pool-128-choices-c2-$UNCERTAIN.safetensors" ] || $CPL profile "${ARGS[@]}"
  run_all retain-choices confident-runs out="$OUT" uncertain="$UNCERTAIN"
done
# more seeds of task A's decisive pair (issue 15: ≥ 3 seeds), read against the paper queue's runs of the same seed:
# SEEDS="1 2" experiments/queues/retain_choices.sh OUT
for SEED in ${SEEDS:-}; do
  run_all retain-choices seed-runs out="$OUT" seed="$SEED"
done

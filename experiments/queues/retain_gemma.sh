#!/usr/bin/env bash
# Retain sets on Gemma 3 270M (issue 15, the second architecture), on the paper-gemma queue's split and settings
# (SGD batch 1, lr 1e-5, 8 epochs, every second a point; seed 0): a choices retain set of 128 questions of
# Gemma's own CommonsenseQA forgetting pool (the rest of the pool is its reach), the per-step rule with the
# choices loss on the task's own M, and the rule's control (random signs). References: the paper-gemma
# sweep's seed-0 runs of full fine-tuning and of the rule with the paper's loss.
# Settings: experiments/configs/retain-gemma.toml.
# Usage: [SEEDS="1 2"] experiments/queues/retain_gemma.sh OUT (after experiments/queues/sweeps.sh OUT paper-gemma
# has made its split)
set -euo pipefail
OUT=${1:?output folder}
source "$(dirname "$0")/settings.sh"
R="$OUT/retain-gemma"
export CPL_MASKS_HOME="$R/home"  # its own registry, as the retain queue's
settings retain-gemma question-files out="$OUT"
[ -f "$R/pool-128.jsonl" ] || $PYTHON experiments/queues/retain_sets.py "${ARGS[@]}"
settings retain-gemma profile out="$OUT"
[ -f "$R/pool-128-choices.safetensors" ] || $CPL profile "${ARGS[@]}"
settings retain-gemma train out="$OUT"; TRAIN=("${ARGS[@]}")
source "$(dirname "$0")/queue_run.sh"
run_all retain-gemma runs out="$OUT"
# more seeds of the retain set and of its control (issue 15: >= 3 seeds), read against the paper-gemma runs of
# the same seed: SEEDS="1 2" experiments/queues/retain_gemma.sh OUT
for SEED in ${SEEDS:-}; do
  run_all retain-gemma retain-seed-runs out="$OUT" seed="$SEED"
done
for SEED in ${SEEDS:-}; do
  run_all retain-gemma control-seed-runs out="$OUT" seed="$SEED"
done
run_all retain-gemma last-runs out="$OUT"

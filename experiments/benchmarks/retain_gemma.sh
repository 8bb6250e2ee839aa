#!/usr/bin/env bash
# Retain sets on Gemma 3 270M (issue 15, the second architecture), on the paper-gemma queue's split and settings
# (SGD batch 1, lr 1e-5, 8 epochs, every second a point; seed 0): a choices retain set of 128 questions of
# Gemma's own CommonsenseQA forgetting pool (the rest of the pool is its reach), the per-step rule with the
# choices loss on the task's own M, and the rule's control (random signs). References: the paper-gemma
# sweep's seed-0 runs of full fine-tuning and of the rule with the paper's loss.
# Usage: [SEEDS="1 2"] benchmarks/retain_gemma.sh OUT (after benchmarks/sweeps.sh OUT paper-gemma has made its split)
set -euo pipefail
OUT=${1:?output folder}; CPL="${CPL:-.venv/bin/cpl-masks}"
SPLIT="$OUT/paper-gemma/split"; R="$OUT/retain-gemma"
export CPL_MASKS_HOME="$R/home"  # its own registry, as the retain queue's
[ -f "$R/pool-128.jsonl" ] || .venv/bin/python benchmarks/retain_sets.py "$SPLIT" "$OUT/reliability/split/mastered.jsonl" \
  --out "$R"
[ -f "$R/pool-128-choices.safetensors" ] || $CPL profile --model gemma3-270m --kind retain --objective choices \
  --mastered "$R/pool-128.jsonl" --scoring loglik --name paper-gemma-pool-128-choices --threads 1 \
  --out "$R/pool-128-choices.safetensors"
TRAIN=(--model gemma3-270m --epochs 8 --eval-every 2 --lr 1e-5 --optimizer sgd --batch-size 1 --scoring loglik
  --threads 1 --heldout "$SPLIT/mastered_heldout.jsonl" --data "$SPLIT/inject.jsonl" --mastered "$SPLIT/mastered.jsonl")
source "$(dirname "$0")/queue_run.sh"
run a-retain-pool128-choices --retain "$R/pool-128-choices.safetensors"
# more seeds of the retain set and of its control (issue 15: >= 3 seeds), read against the paper-gemma runs of
# the same seed: SEEDS="1 2" benchmarks/retain_gemma.sh OUT
for SEED in ${SEEDS:-}; do
  run a-retain-pool128-choices-s$SEED --retain "$R/pool-128-choices.safetensors" --seed $SEED
done
for SEED in ${SEEDS:-}; do
  run a-random-signs-s$SEED --mode random-signs --seed $SEED
done
run a-random-signs --mode random-signs
run a-dynamic-choices --mode dynamic --objective choices

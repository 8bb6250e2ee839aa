#!/usr/bin/env bash
# The experiments behind RESULTS.md. Each queue is one or more resumable `cpl-masks sweep`s (or the steps of one
# experiment), each with its settings in experiments/configs/NAME.toml: re-running a queue skips finished runs.
# Usage, from the repository root: experiments/queues/sweeps.sh OUT_DIR QUEUE   (DRY_RUN=1: print the commands)
# QUEUE: demo | others | seeds | adamw | stability | paper | paper-gemma | paper-shares | reliability | reliability-gemma
# | retain (after paper and reliability) | staleness | staleness-gemma.
# On a 2-core machine run demo and others in parallel
# (one thread each), then seeds and adamw (after demo) and stability (after others). A queue that is one sweep
# (paper, paper-gemma, paper-shares) can be started twice at once: the two processes share its runs.
set -euo pipefail
OUT=${1:?output folder}; QUEUE=${2:?queue}
source "$(dirname "$0")/settings.sh"
DATA=../shared/data

sweep() {  # sweep NAME: the [sweep] of configs/NAME.toml
  settings "$1" sweep out="$OUT" data="$DATA"
  $CPL sweep "${ARGS[@]}"
}

case "$QUEUE" in
demo)  # SmolLM2-135M-Instruct on the built-in demo set: every method, three learning rates
  sweep smollm2-demo
  ;;
others)
  until [ -n "${DRY_RUN:-}" ] || [ -f "$OUT/smollm2-demo/masks/cpl.safetensors" ]; do sleep 20; done
  sweep smollm2-csqa  # CommonsenseQA sample: own mask, controls, and the demo's mask reused (cross-task)
  sweep gemma3-demo  # Gemma 3 270M (base model, second architecture) on the demo set
  sweep smollm2-mmlu  # MMLU sample, one learning rate
  ;;
seeds)  # the headline rows with two more seeds (example order, random mask); seed 0 is the demo
  # queue's run (same split, masks and settings): results_tables.py --merge pools them
  sweep smollm2-demo-seeds
  ;;
adamw)  # AdamW beside SGD for the methods whose optimizer state differs: full, mask (MaskedAdamW), lora
  sweep smollm2-demo-adamw
  ;;
paper | paper-gemma)  # the paper's regime: SGD batch 1, a small learning rate, many epochs (configs/paper*.toml)
  sweep "$QUEUE"
  ;;
paper-shares)  # the paper's regime again (same split), the CPL mask and a random mask at kept shares 0.9 and 0.5
  sweep paper-shares
  ;;
reliability | reliability-gemma)  # selections from disjoint halves of MMLU at 10..160 questions a set, per rule
  settings "$QUEUE" split out="$OUT" data="$DATA"
  $CPL split "${ARGS[@]}"
  settings "$QUEUE" reliability out="$OUT"
  $PYTHON experiments/analysis/mask_reliability.py "${ARGS[@]}"
  ;;
retain)  # retain sets in the paper's regime (SmolLM2, the paper queue's split and seed 0; 6 epochs): how far a
  # retain set's protection reaches (a share of the forgetting pool, the rest measured) and its reuse on a second task
  R="$OUT/retain"
  export CPL_MASKS_HOME="$R/home"  # its own registry: the other queues' processes keep theirs as they found it
  settings retain question-files out="$OUT"
  $PYTHON experiments/queues/retain_sets.py "${ARGS[@]}"
  settings retain sets
  for SET in "${ARGS[@]}"; do
    settings retain profile out="$OUT" set="$SET"
    [ -f "$R/$SET.safetensors" ] || $CPL profile "${ARGS[@]}"
  done
  settings retain task-b-split out="$OUT"
  [ -f "$R/task-b/split.json" ] || $CPL split "${ARGS[@]}"
  settings retain train out="$OUT"; TRAIN=("${ARGS[@]}")
  source "$(dirname "$0")/queue_run.sh"
  run_all retain runs out="$OUT"
  ;;
staleness | staleness-gemma)  # sign(g_M) of the retain queue's pool-128, stored at the start, against g_M's
  # signs after each epoch of plain fine-tuning on the paper split (after retain, or retain-gemma's question files)
  settings "$QUEUE" staleness out="$OUT"
  $PYTHON experiments/analysis/sign_staleness.py "${ARGS[@]}"
  ;;
stability)  # masks from disjoint halves of one split, and across tasks
  settings stability stability out="$OUT"
  $PYTHON experiments/analysis/mask_stability.py "${ARGS[@]}"
  ;;
*) echo "unknown queue $QUEUE" >&2; exit 2 ;;
esac

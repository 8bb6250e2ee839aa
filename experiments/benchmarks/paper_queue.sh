# Sourced by the single runs on a paper queue's split (reprofiled.sh, refresh_cost.sh), with OUT and QUEUE set:
# S, the queue's folder; MODEL, its --model option; RUNS, where the single runs go (beside paper-extra's seed-0
# runs); TRAIN, the queue's settings (paper: SmolLM2, 12 epochs at lr 3e-5; paper-gemma: Gemma 3 270M, 8 epochs
# at lr 1e-5), split and retain text; and queue_run.sh's run.
S="$OUT/$QUEUE"; RUNS="$OUT/$QUEUE-extra"
case $QUEUE in
  paper) MODEL=(); SETTINGS=(--epochs 12 --lr 3e-5) ;;
  paper-gemma) MODEL=(--model gemma3-270m); SETTINGS=(--epochs 8 --lr 1e-5) ;;
  *) echo "unknown queue: $QUEUE (paper or paper-gemma)" >&2; exit 2 ;;
esac
TRAIN=("${MODEL[@]}" "${SETTINGS[@]}" --eval-every 2 --optimizer sgd --batch-size 1 --scoring loglik --task demo --threads 1
  --data "$S/split/inject.jsonl" --mastered "$S/split/mastered.jsonl" --heldout "$S/split/mastered_heldout.jsonl"
  --retain-text "$S/retain.txt")
source "$(dirname "${BASH_SOURCE[0]}")/queue_run.sh"

# Sourced by the single runs on a paper queue's split (reprofiled.sh, refresh_cost.sh), with OUT and QUEUE set:
# S, the queue's folder; MODEL, its --model option; RUNS, where the single runs go (beside paper-extra's seed-0
# runs); TRAIN, the queue's settings (configs/QUEUE.toml's [model] and [train]: paper: SmolLM2, 12 epochs at
# lr 3e-5; paper-gemma: Gemma 3 270M, 8 epochs at lr 1e-5), split and retain text; settings.sh's settings and
# queue_run.sh's run.
S="$OUT/$QUEUE"; RUNS="$OUT/$QUEUE-extra"
case $QUEUE in
  paper | paper-gemma) ;;
  *) echo "unknown queue: $QUEUE (paper or paper-gemma)" >&2; exit 2 ;;
esac
source "$(dirname "${BASH_SOURCE[0]}")/settings.sh"
settings "$QUEUE" model; MODEL=("${ARGS[@]}")
settings "$QUEUE" train out="$OUT"; TRAIN=("${MODEL[@]}" "${ARGS[@]}")
source "$(dirname "${BASH_SOURCE[0]}")/queue_run.sh"

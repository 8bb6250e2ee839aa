#!/usr/bin/env bash
# The experiments behind RESULTS.md. Each queue is one or more resumable `cpl-masks sweep`s:
# re-running a queue skips finished runs. Usage: benchmarks/sweeps.sh OUT_DIR QUEUE
# QUEUE: demo | others | seeds | adamw | stability | paper | paper-gemma | paper-shares | reliability | reliability-gemma
# | retain (after paper and reliability) | staleness | staleness-gemma.
# On a 2-core machine run demo and others in parallel
# (one thread each), then seeds and adamw (after demo) and stability (after others). A queue that is one sweep
# (paper, paper-gemma, paper-shares) can be started twice at once: the two processes share its runs.
set -euo pipefail
OUT=${1:?output folder}; QUEUE=${2:?queue}
CPL="${CPL:-.venv/bin/cpl-masks}"
DATA=../shared/data
COMMON=(--threads 1 --scoring loglik --holdout-fraction 0.25 --forgetting-budget 0.02)

case "$QUEUE" in
demo)  # SmolLM2-135M-Instruct on the built-in demo set: every method, three learning rates
  $CPL sweep --data builtin:demo --limit 96 --epochs 1 --lr-grid 1e-4,3e-4,1e-3 \
    --method-lr-grid lora=3e-3,1e-2,3e-2 --ewc-lambda 0.3 --replay-share 0.3 "${COMMON[@]}" \
    --out "$OUT/smollm2-demo"
  ;;
others)
  until [ -f "$OUT/smollm2-demo/masks/cpl.safetensors" ]; do sleep 20; done
  # CommonsenseQA sample: own mask, controls, and the demo's mask reused (cross-task)
  $CPL sweep --data $DATA/csqa.jsonl --limit 96 --epochs 1 --lr-grid 3e-4,1e-3 \
    --methods "full,mask,random,gradient-magnitude,reuse:$OUT/smollm2-demo/masks/cpl.safetensors" \
    "${COMMON[@]}" --out "$OUT/smollm2-csqa"
  # Gemma 3 270M (base model, second architecture) on the demo set
  $CPL sweep --model gemma3-270m --data builtin:demo --limit 96 --epochs 1 --lr-grid 3e-4,1e-3 \
    --methods full,mask,random "${COMMON[@]}" --out "$OUT/gemma3-demo"
  # MMLU sample, one learning rate
  $CPL sweep --data $DATA/mmlu.jsonl --limit 64 --epochs 1 --lr-grid 1e-3 \
    --methods full,mask,random --retain-text "$OUT/smollm2-demo/retain.txt" "${COMMON[@]}" --out "$OUT/smollm2-mmlu"
  ;;
seeds)  # the headline rows with two more seeds (example order, random mask); seed 0 is the demo
  # queue's run (same split, masks and settings): results_tables.py --merge pools them
  $CPL sweep --data builtin:demo --limit 96 --epochs 1 --lr-grid 1e-3 --seeds 1,2 \
    --methods full,mask,random "${COMMON[@]}" --out "$OUT/smollm2-demo-seeds"
  ;;
adamw)  # AdamW beside SGD for the methods whose optimizer state differs: full, mask (MaskedAdamW), lora
  $CPL sweep --data builtin:demo --limit 96 --epochs 1 --optimizer adamw --lr-grid 1e-5,1e-4 \
    --methods full,mask,lora --method-lr-grid lora=1e-4,1e-3 "${COMMON[@]}" --out "$OUT/smollm2-demo-adamw"
  ;;
paper | paper-gemma)  # the paper's regime: SGD batch 1, a small learning rate, many epochs, every 2nd epoch
  # a point; 80 invented facts to inject; a forgetting pool of CommonsenseQA questions the model answers right
  # by a margin of at least 0.5; budget: 1 % of the held-out questions. Gemma 3 270M learns about three times
  # as fast per step at 3e-5 (half of I in ~2 epochs), so it runs at 1e-5 for 8 epochs: half of I in ~5.
  MODEL=smollm2-135m-instruct; LR=3e-5; EPOCHS=12
  [ "$QUEUE" = paper-gemma ] && { MODEL=gemma3-270m; LR=1e-5; EPOCHS=8; }
  $CPL sweep --model $MODEL --data builtin:demo --limit 160 --heldout-data $DATA/csqa.jsonl --heldout-limit 400 \
    --min-margin 0.5 --epochs $EPOCHS --eval-every 2 --lr-grid $LR --method-lr-grid lora=1e-3 \
    --methods full,mask,dynamic,random,lora --seeds 0,1,2 --threads 1 --scoring loglik --holdout-fraction 0.25 \
    --forgetting-budget 0.01 --out "$OUT/$QUEUE"
  ;;
paper-shares)  # the paper's regime again (same split), the CPL mask and a random mask at kept shares 0.9 and 0.5
  $CPL sweep --data builtin:demo --limit 160 --heldout-data $DATA/csqa.jsonl --heldout-limit 400 \
    --min-margin 0.5 --epochs 12 --eval-every 2 --lr-grid 3e-5 --methods mask,random --keep-fraction-grid 0.9,0.5 \
    --seeds 0 --threads 1 --scoring loglik --holdout-fraction 0.25 --forgetting-budget 0.01 --out "$OUT/paper-shares"
  ;;
reliability | reliability-gemma)  # selections from disjoint halves of MMLU at 10..160 questions a set, per rule
  MODEL=smollm2-135m-instruct; [ "$QUEUE" = reliability-gemma ] && MODEL=gemma3-270m
  $CPL split --model $MODEL --data $DATA/mmlu.jsonl --scoring loglik --holdout-fraction 0 --min-margin 0 --threads 1 \
    --out "$OUT/$QUEUE/split" --overwrite
  .venv/bin/python benchmarks/mask_reliability.py "$OUT/$QUEUE/split" --model $MODEL --sizes 10,20,40,80,160 \
    --confidence 2 --threads 1 --out "$OUT/$QUEUE/reliability.json" --plot "$OUT/$QUEUE/reliability.png"
  ;;
retain)  # retain sets in the paper's regime (SmolLM2, the paper queue's split and seed 0; 6 epochs): how far a
  # retain set's protection reaches (a share of the forgetting pool, the rest measured) and its reuse on a second task
  SPLIT="$OUT/paper/split"; R="$OUT/retain"
  export CPL_MASKS_HOME="$R/home"  # its own registry: the other queues' processes keep theirs as they found it
  .venv/bin/python benchmarks/retain_sets.py "$SPLIT" "$OUT/reliability/split/mastered.jsonl" --out "$R"
  for SET in pool-128 pool-32 mmlu-128; do
    [ -f "$R/$SET.safetensors" ] || $CPL profile --kind retain --mastered "$R/$SET.jsonl" --scoring loglik \
      --name "paper-$SET" --threads 1 --out "$R/$SET.safetensors"
  done
  [ -f "$R/task-b/split.json" ] || $CPL split --data "$R/task-b.jsonl" --scoring loglik --holdout-fraction 0 \
    --min-margin 0.5 --threads 1 --out "$R/task-b" --overwrite
  TRAIN=(--epochs 6 --eval-every 2 --lr 3e-5 --optimizer sgd --batch-size 1 --scoring loglik --threads 1
    --heldout "$SPLIT/mastered_heldout.jsonl")
  source "$(dirname "$0")/queue_run.sh"
  A=(--data "$SPLIT/inject.jsonl" --mastered "$SPLIT/mastered.jsonl")
  B=(--data "$R/task-b/inject.jsonl" --mastered "$R/task-b/mastered.jsonl")
  run a-retain-pool128 "${A[@]}" --retain "$R/pool-128.safetensors"
  run b-full "${B[@]}" --mode full
  run b-dynamic "${B[@]}" --mode dynamic
  run b-retain-pool128 "${B[@]}" --retain "$R/pool-128.safetensors"
  run a-retain-mmlu128 "${A[@]}" --retain "$R/mmlu-128.safetensors"
  run a-retain-pool32 "${A[@]}" --retain "$R/pool-32.safetensors"
  ;;
staleness | staleness-gemma)  # sign(g_M) of the retain queue's pool-128, stored at the start, against g_M's
  # signs after each epoch of plain fine-tuning on the paper split (after retain, or retain-gemma's question files)
  MODEL=smollm2-135m-instruct; SPLIT="$OUT/paper/split"; R="$OUT/retain"; LR=3e-5
  [ "$QUEUE" = staleness-gemma ] && { MODEL=gemma3-270m; SPLIT="$OUT/paper-gemma/split"; R="$OUT/retain-gemma"; LR=1e-5; }
  .venv/bin/python benchmarks/sign_staleness.py --model $MODEL --mastered "$R/pool-128.jsonl" --inject "$SPLIT/inject.jsonl" \
    --lr $LR --epochs 5 --threads 1 --out "$OUT/staleness/$QUEUE.json" --plot "$OUT/staleness/$QUEUE.png"
  ;;
stability)  # masks from disjoint halves of one split, and across tasks
  .venv/bin/python benchmarks/mask_stability.py "$OUT/smollm2-demo" "$OUT/smollm2-csqa" "$OUT/smollm2-mmlu" \
    --out "$OUT/stability.json"
  ;;
*) echo "unknown queue $QUEUE" >&2; exit 2 ;;
esac

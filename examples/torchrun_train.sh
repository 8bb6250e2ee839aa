#!/usr/bin/env bash
# Split once, then profile a mask and train with it under torchrun (N processes, DDP).
#
#   examples/torchrun_train.sh [MODEL] [OUT] [NPROC]
#
# MODEL defaults to the built-in smollm2-135m-instruct, OUT to runs/torchrun, NPROC to 2. On a CPU
# the ranks talk over gloo, on GPUs over nccl (one GPU per rank). Environment: DATA (default
# builtin:demo), LIMIT (questions, default 16), EPOCHS (default 1), DISTRIBUTED (ddp or fsdp2,
# default ddp), DEVICE (default auto). The test suite runs it on a tiny random model.
set -euo pipefail

MODEL=${1:-smollm2-135m-instruct}
OUT=${2:-runs/torchrun}
NPROC=${3:-2}
DATA=${DATA:-builtin:demo}
LIMIT=${LIMIT:-16}
EPOCHS=${EPOCHS:-1}
DISTRIBUTED=${DISTRIBUTED:-ddp}
DEVICE=${DEVICE:-auto}
PYTHON=${PYTHON:-python}
CPL=$(command -v cpl-masks)
TORCHRUN=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" --no-python "$CPL")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# 1. Split (one process: scoring each question once is cheap).
cpl-masks split --model "$MODEL" --data "$DATA" --limit "$LIMIT" --scoring loglik --holdout-fraction 0.25 \
    --device "$DEVICE" --out "$OUT/split" --overwrite

# 2. Profile: each rank takes every NPROC-th question; rank 0 saves and registers the mask.
"${TORCHRUN[@]}" profile --model "$MODEL" --mastered "$OUT/split/mastered.jsonl" \
    --inject "$OUT/split/inject.jsonl" --batch-size 4 --distributed "$DISTRIBUTED" --device "$DEVICE" \
    --name torchrun --out "$OUT/mask.safetensors"

# 3. Train with the mask: each step's batch is split over the ranks; rank 0 writes the run folder.
"${TORCHRUN[@]}" train --model "$MODEL" --mask "$OUT/mask.safetensors" --data "$OUT/split/inject.jsonl" \
    --mastered "$OUT/split/mastered.jsonl" --heldout "$OUT/split/mastered_heldout.jsonl" \
    --epochs "$EPOCHS" --lr 1e-3 --batch-size 4 --distributed "$DISTRIBUTED" --device "$DEVICE" \
    --out "$OUT/cpl" --overwrite

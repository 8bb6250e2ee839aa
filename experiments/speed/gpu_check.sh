#!/usr/bin/env bash
# GPU check (under 8 minutes on one GPU): split ~64 ARC-Challenge questions with SmolLM2-135M-Instruct,
# profile a mask one question at a time (--batch-size 1) and batched (16), then train with the mask
# and with full fine-tuning; prints the time and peak GPU memory of each step and the batched speed-up.
#
#   experiments/speed/gpu_check.sh [OUT]        (default OUT: runs/gpu_check; it is overwritten)
#
# Environment: MODEL (default smollm2-135m-instruct), DATA (default ../shared/data/arc_challenge.jsonl,
# else builtin:demo), LIMIT (64), SCORING (loglik), EPOCHS (1), LR (1e-4), DTYPE (float32; bfloat16
# trains float32 master weights under bf16 autocast), DEVICE (cuda; cpu for a dry run of the commands
# on a small model), CPL (.venv/bin/cpl-masks). The registry goes to OUT/home, not the user's.
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=${1:-runs/gpu_check}
MODEL=${MODEL:-smollm2-135m-instruct}
DATA=${DATA:-../shared/data/arc_challenge.jsonl}
[ -f "$DATA" ] || [ "${DATA#builtin:}" != "$DATA" ] || DATA=builtin:demo
LIMIT=${LIMIT:-64}
SCORING=${SCORING:-loglik}
EPOCHS=${EPOCHS:-1}
LR=${LR:-1e-4}
DTYPE=${DTYPE:-float32}
DEVICE=${DEVICE:-cuda}
CPL=${CPL:-.venv/bin/cpl-masks}
PYTHON=${PYTHON:-$(dirname "$CPL")/python}
export CPL_MASKS_HOME="$OUT/home"
if [ "$DEVICE" != cpu ]; then nvidia-smi -L; fi
rm -rf "$OUT" && mkdir -p "$OUT"
COMMON=(--model "$MODEL" --device "$DEVICE" --dtype "$DTYPE")

echo "== split: $LIMIT questions of $DATA ($SCORING scoring)"
$CPL split "${COMMON[@]}" --data "$DATA" --limit "$LIMIT" --scoring "$SCORING" --holdout-fraction 0.25 \
    --out "$OUT/split" > "$OUT/split.log"
SPLIT=(--mastered "$OUT/split/mastered.jsonl" --inject "$OUT/split/inject.jsonl")

for BATCH in 1 16; do
    echo "== profile, batch size $BATCH"
    $CPL profile "${COMMON[@]}" "${SPLIT[@]}" --batch-size "$BATCH" --name "gpu-check-b$BATCH" \
        --out "$OUT/mask-b$BATCH.safetensors" > "$OUT/profile-b$BATCH.log"
done

for RUN in "mask --mask $OUT/mask-b16.safetensors" "full --mode full"; do
    set -- $RUN
    echo "== train: $1"
    $CPL train "${COMMON[@]}" $2 $3 --data "$OUT/split/inject.jsonl" --mastered "$OUT/split/mastered.jsonl" \
        --heldout "$OUT/split/mastered_heldout.jsonl" --epochs "$EPOCHS" --lr "$LR" --out "$OUT/$1" \
        > "$OUT/train-$1.log"
done

"$PYTHON" - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

from cpl_masks import read_header

out = Path(sys.argv[1])
rows = []
for batch in (1, 16):
    meta = read_header(out / f"mask-b{batch}.safetensors")["metadata"]
    run = meta["profile"]
    rows.append((f"profile, batch {batch}", run["seconds"], run["peak_memory_bytes"], run["peak_memory_kind"]))
for name in ("mask", "full"):
    run = json.loads((out / name / "run.json").read_text())
    final = run["final"]
    rows.append((f"train {name} ({final['learned']} learned, {final['forgotten']} forgotten)",
                 run["time_s"], run["peak_memory_bytes"], run["peak_memory_kind"]))
print(f"{'step':<44} {'time (s)':>9} {'peak memory (MiB)':>18}")
for label, seconds, peak, kind in rows:
    print(f"{label:<44} {seconds:>9.1f} {peak / 2**20:>14.0f} ({kind})")
one, batched = rows[0][1], rows[1][1]
print(f"batched profile speed-up (batch 1 / batch 16): {one / batched:.2f}x")
EOF

#!/usr/bin/env bash
# Wall time of one of RESULTS.md's sweeps (MMLU sample: full, mask, random; 1 epoch) with the code of
# two commits, one after the other, one thread each. Usage:
#   git worktree add ../before REV && ln -s ../cli ../before/cpl_masks/cli && ln -s ../registry ../before/cpl_masks/registry
#   bash experiments/speed/sweep_walltime.sh ../before OUT_DIR
# "before" runs with PYTHONPATH pointing at the worktree, "after" with this checkout; each gets its own
# registry home, so the two never share a cache or a database.
set -euo pipefail
BEFORE=$(cd "${1:?worktree of the earlier commit}" && pwd); OUT=${2:?output folder}
cd "$(dirname "$0")/../.."
PY="$PWD/.venv/bin/python"; DATA=$(cd ../shared/data && pwd)
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
"$PY" -c "from cpl_masks.data.demo import retain_text; print(retain_text(), end='')" > "$OUT/retain.txt"
for side in before after; do
  root=$PWD; [ $side = before ] && root=$BEFORE
  start=$(date +%s.%N)
  # python -c puts the working directory first on sys.path: run each side from its own tree
  (cd "$root" && PYTHONPATH=$root CPL_MASKS_HOME="$OUT/home-$side" "$PY" -c "from cpl_masks.cli.app import main; main()" \
    sweep --data "$DATA/mmlu.jsonl" --limit 64 --epochs 1 --lr-grid 1e-3 --methods full,mask,random \
    --threads 1 --scoring loglik --holdout-fraction 0.25 --forgetting-budget 0.02 --retain-text "$OUT/retain.txt" \
    --out "$OUT/$side" > "$OUT/$side.log" 2>&1)
  echo "$side: $(echo "$(date +%s.%N) - $start" | bc) s"
done

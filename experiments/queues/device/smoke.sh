#!/bin/bash
# Device smoke test: a whole sweep on a tiny random model on the GPU, then a folder seeded with its split
# and CPL mask trained for another seed with a fresh home (nothing re-split or re-profiled).
set -euo pipefail
W=${SMOKE_DIR:-/root/smoke}; rm -rf "$W"; mkdir -p "$W"
cpl() { python3 -P -c "from cpl_masks.cli.app import main; main()" "$@"; }
python3 -P -c "
import sys; sys.path.append('.')
from pathlib import Path
from tests.conftest import build_tiny_model
build_tiny_model(Path('$W/tiny'))"
ARGS="--model $W/tiny --data builtin:demo --limit 40 --epochs 2 --eval-every 1 --lr-grid 1e-3 --method-lr-grid lora=1e-2 --methods full,mask,dynamic,random,lora --threads 1 --scoring loglik"
CPL_MASKS_HOME=$W/home cpl sweep $ARGS --seeds 0 --out $W/a 2>&1 | grep -v "━" | tail -n 25
mkdir -p $W/b/masks && cp -r $W/a/split $W/a/sweep_config.json $W/b/ && cp $W/a/masks/cpl.safetensors $W/b/masks/
CPL_MASKS_HOME=$W/home2 cpl sweep $ARGS --seeds 1 --out $W/b > $W/b.log 2>&1
grep -E "splitting|profiling" $W/b.log && { echo "SMOKE: seeded folder was re-split or re-profiled"; exit 1; }
grep -v "━" $W/b.log | tail -n 12
python3 -P -c "import json; d=json.load(open('$W/b/sweep.json')); print('SMOKE OK complete', d['complete'], 'runs', len(d['runs']))"

#!/usr/bin/env bash
# Issue 10 on the real model (SmolLM2-135M-Instruct): every way to lose work or get a wrong answer
# silently that the issue lists, tried as a user would, in a scratch folder and registry (~6 min on
# 2 cores). Each step prints what the tool answers. Usage: bash benchmarks/lose_nothing.sh [SCRATCH]
set -u
cd "$(dirname "$0")/.."
CPL="$PWD/.venv/bin/cpl-masks"
E=${1:-$(mktemp -d /tmp/cpl-lose-nothing.XXXX)}
if [ -n "$(ls -A "$E" 2>/dev/null)" ]; then echo "$E is not empty; give a new folder" >&2; exit 2; fi
mkdir -p "$E/elsewhere"
export CPL_MASKS_HOME=$E/home
step() { echo; echo "=== $*"; }
step "split (loglik, 64 questions)"
$CPL split --data builtin:demo --limit 64 --scoring loglik --holdout-fraction 0.25 --out $E/split
step "profile --keep-fraction 0.5 --save-scores (exact share expected)"
$CPL profile --mastered $E/split/mastered.jsonl --inject $E/split/inject.jsonl --keep-fraction 0.5 --save-scores --name demo --out $E/mask.safetensors 2>&1 | grep -E "overall|registered|mask "
step "profile onto an existing --out: refused before the model loads"
time $CPL profile --mastered $E/split/mastered.jsonl --inject $E/split/inject.jsonl --name demo --out $E/mask.safetensors
step "profile onto its input question file, even with --overwrite"
$CPL profile --mastered $E/split/mastered.jsonl --inject $E/split/inject.jsonl --out $E/split/inject.jsonl --overwrite
step "threshold onto its own input, even with --overwrite"
$CPL threshold $E/mask.safetensors --keep-fraction 0.3 -o $E/mask.safetensors --overwrite
step "threshold re-cut: source recut, not the latest of the task"
$CPL threshold $E/mask.safetensors --keep-fraction 0.3 -o $E/recut.safetensors 2>&1 | grep -E "registered|overall"
step "the same bits under another --name"
$CPL registry add $E/mask.safetensors --name demo-copy
step "registry list at 60 columns, piped"
COLUMNS=60 $CPL registry list | cat
step "train with the mask, 1 epoch, then resume from another cwd with --epochs 2 --lr 5e-4"
$CPL train --mask $E/mask.safetensors --data $E/split/inject.jsonl --mastered $E/split/mastered.jsonl --epochs 1 --lr 1e-3 --out $E/run 2>&1 | tail -3
rm $E/run/run.json  # pretend it stopped after epoch 1 (its checkpoint is there)
(cd $E/elsewhere && $CPL train --resume ../run --epochs 2 --lr 5e-4 2>&1 | tail -3)
"$PWD/.venv/bin/python" -c "import json; r=json.load(open('$E/run/run.json')); print('resume_changes', r['resume_changes'], 'task', r['task'])"
step "--resume with another option is refused"
$CPL train --resume $E/run --optimizer adamw
step "registry rm: a bare name is refused; runs and children refuse; --force keeps the runs"
$CPL registry rm smollm2-135m-instruct/demo
$CPL registry rm smollm2-135m-instruct/demo@v1
$CPL registry rm smollm2-135m-instruct/demo@v1 --force
$CPL registry runs
step "a zero-byte database is an error, gc deletes nothing"
mv $CPL_MASKS_HOME/registry.sqlite3 $E/db.bak; rm -f $CPL_MASKS_HOME/registry.sqlite3-*; : > $CPL_MASKS_HOME/registry.sqlite3
$CPL registry gc; ls $CPL_MASKS_HOME/masks/*/ | wc -l
step "train with an unreadable registry: refused before the model loads"
time $CPL train --mask $E/recut.safetensors --data $E/split/inject.jsonl --mastered $E/split/mastered.jsonl --epochs 1 --out $E/run2
ls $E/run2 2>&1
step "bfloat16 model with its float32 mask"
"$PWD/.venv/bin/python" - <<PY
from cpl_masks.masks import Mask
from cpl_masks.models import load_model, DEFAULT_MODEL
loaded = load_model(DEFAULT_MODEL, dtype="bfloat16")
Mask.load("$E/mask.safetensors").check_model(loaded.model)
print("bf16 model accepted its own float32 mask")
PY
step "momentum -5 / scoring foo / negative limit"
$CPL train --mode full --data $E/split/inject.jsonl --mastered $E/split/mastered.jsonl --optimizer momentum --momentum -5 --out $E/run3
CPL_MASKS_HOME=$E/home2 $CPL train --mask $E/recut.safetensors --data $E/split/inject.jsonl --mastered $E/split/mastered.jsonl --scoring foo --out $E/run3
$CPL split --data builtin:demo --limit -3 --out $E/split2

#!/usr/bin/env bash
# Issues 10 and 18 on the real model (SmolLM2-135M-Instruct): every way to lose work or get a wrong answer
# silently that the issues list, tried as a user would, in a scratch folder and registry (~9 min on
# 2 cores). Each step prints what the tool answers. Usage: bash experiments/checks/lose_nothing.sh [SCRATCH]
set -u
cd "$(dirname "$0")/../.."
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
$CPL train --mask $E/mask.safetensors --inject $E/split/inject.jsonl --mastered $E/split/mastered.jsonl --epochs 1 --lr 1e-3 --out $E/run 2>&1 | tail -3
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
time $CPL train --mask $E/recut.safetensors --inject $E/split/inject.jsonl --mastered $E/split/mastered.jsonl --epochs 1 --out $E/run2
ls $E/run2 2>&1
step "bfloat16 model with its float32 mask"
"$PWD/.venv/bin/python" - <<PY
from cpl_masks import Mask
from cpl_masks import DEFAULT_MODEL, load_model
loaded = load_model(DEFAULT_MODEL, dtype="bfloat16")
Mask.load("$E/mask.safetensors").check_model(loaded.model)
print("bf16 model accepted its own float32 mask")
PY
step "momentum -5 / scoring foo / negative limit"
$CPL train --mode full --data $E/split/inject.jsonl --mastered $E/split/mastered.jsonl --optimizer momentum --momentum -5 --out $E/run3
CPL_MASKS_HOME=$E/home2 $CPL train --mask $E/recut.safetensors --data $E/split/inject.jsonl --mastered $E/split/mastered.jsonl --scoring foo --out $E/run3
$CPL split --data builtin:demo --limit -3 --out $E/split2

# Issue 18: masks from strangers, runs that race, disks that fill. A fresh registry for these.
export CPL_MASKS_HOME=$E/home18
PY="$PWD/.venv/bin/python"
step "18: split --overwrite onto its own --data in --out: refused, the 64 lines stay"
mkdir -p $E/s18 && head -64 $E/split/mastered.jsonl > $E/s18/inject.jsonl && wc -l < $E/s18/inject.jsonl
$CPL split --data $E/s18/inject.jsonl --out $E/s18 --overwrite; wc -l < $E/s18/inject.jsonl
step "18: --overwrite into the registry's home: refused, the registry still reads"
$CPL registry add $E/mask.safetensors --name demo
STORED=$($CPL registry show smollm2-135m-instruct/demo --json | "$PY" -c "import json,sys; print(json.load(sys.stdin)['path'])")
$CPL threshold $E/mask.safetensors --keep-fraction 0.3 -o $STORED --overwrite
$CPL combine --op and $E/mask.safetensors $E/recut.safetensors -o $CPL_MASKS_HOME/registry.sqlite3 --overwrite
$CPL registry list | cat
step "18: a file created while profile runs is not replaced (no --overwrite)"
rm -f $E/late.safetensors
$CPL profile --mastered $E/split/mastered.jsonl --inject $E/split/inject.jsonl --out $E/late.safetensors > $E/late.log 2>&1 &
sleep 20; echo "the user's own file" > $E/late.safetensors; wait $!; echo "exit $?"; tail -1 $E/late.log; cat $E/late.safetensors
step "18: --plot onto the mask itself, or onto an existing file: refused"
cp $E/mask.safetensors $E/victim.safetensors; echo '{"keep": true}' > $E/notes.json
$CPL inspect $E/victim.safetensors --plot $E/victim.safetensors --overwrite
$CPL inspect $E/victim.safetensors --plot $E/notes.json; cat $E/notes.json
$CPL compare $E/run $E/run --plot $E/notes.json; cat $E/notes.json
step "18: files get the umask's mode (0644 under umask 022), not 0600"
(umask 022; $CPL threshold $E/mask.safetensors --keep-fraction 0.4 -o $E/mode.safetensors > /dev/null; stat -c '%a %n' $E/mode.safetensors)
step "18: a second train into a live run folder: refused naming the live pid"
$CPL train --mask $E/mask.safetensors --inject $E/split/inject.jsonl --mastered $E/split/mastered.jsonl --epochs 1 --out $E/race > /dev/null 2>&1 &
sleep 15; $CPL train --mask $E/mask.safetensors --inject $E/split/inject.jsonl --mastered $E/split/mastered.jsonl --epochs 1 --out $E/race --overwrite; wait
step "18: registry rm of the mask a running train uses by name: refused while it runs; SIGTERM says how to resume"
$CPL train --mask smollm2-135m-instruct/demo --data $E/split/inject.jsonl --mastered $E/split/mastered.jsonl --epochs 2 --out $E/held > $E/held.log 2>&1 &
TRAIN=$!; sleep 40; $CPL registry rm smollm2-135m-instruct/demo@v1 --force
kill -TERM $TRAIN; wait $TRAIN; echo "exit $?"; tail -2 $E/held.log
step "18: hostile metadata (escape sequences, rich markup) is shown, not obeyed"
"$PY" - <<PY
import torch
from cpl_masks import Mask
bits = {"model.layers.0.mlp.up_proj.weight": torch.rand(3, 5) > 0.5}
hostile = "\x1b[2J[link=https://evil.example]click[/link] [/]"
Mask.from_bool(bits, {"model": {"ref": "org/" + hostile}, "scoring": hostile, "parents": []}).save("$E/hostile.safetensors")
PY
$CPL inspect $E/hostile.safetensors | cat -v | head -8
$CPL registry add $E/hostile.safetensors && $CPL registry show $E/hostile.safetensors | cat -v | grep -E "scoring|model"
$CPL inspect "$E/no[/]such.safetensors"
$CPL split --data "$E/q[red].jsonl" --out $E/s18b
$CPL registry add $E/hostile.safetensors --name "$(printf 'a%.0s' $(seq 1 10000))" 2>&1 | cut -c1-160
step "18: crafted headers: shape [10**20], no data_offsets, a non-string cpl_mask, wrong metadata types"
"$PY" - <<PY
import json, struct
data = open("$E/mask.safetensors", "rb").read()
n = struct.unpack("<Q", data[:8])[0]
raw, body = json.loads(data[8:8 + n]), data[8 + n:]
def write(name, change):
    header = json.loads(json.dumps(raw)); cpl = json.loads(header["__metadata__"]["cpl_mask"])
    change(header, cpl)
    if isinstance(header["__metadata__"].get("cpl_mask"), str): header["__metadata__"]["cpl_mask"] = json.dumps(cpl)
    text = json.dumps(header).encode(); open(f"$E/{name}.safetensors", "wb").write(struct.pack("<Q", len(text)) + text + body)
first = next(key for key in raw if key != "__metadata__" and not key.startswith("scores/"))
write("huge", lambda h, c: c["shapes"].update({first: [10**20]}))
write("nooffsets", lambda h, c: h[first].pop("data_offsets"))
write("intheader", lambda h, c: h["__metadata__"].update(cpl_mask=5))
write("modeltype", lambda h, c: c["metadata"].update(model="tiny", parents=[1, 2]))
PY
for name in huge nooffsets intheader modeltype; do $CPL inspect $E/$name.safetensors; done
step "18: question files: JSON nested 5000 deep, a lone surrogate, a same-size rewrite with the old mtime"
"$PY" -c "print('{\"question\": \"q\", \"choices\": ' + '[' * 5000 + ']' * 5000 + ', \"answer\": 0}')" > $E/deep.jsonl
printf '{"question": "what \\ud800?", "choices": ["a", "b"], "answer": 0}\n' > $E/surrogate.jsonl
$CPL split --data $E/deep.jsonl --out $E/s18c; $CPL split --data $E/surrogate.jsonl --out $E/s18c
"$PY" - <<PY
import json, os
from cpl_masks import load_questions
path = "$E/swap.jsonl"
rows = [{"question": f"q{i}?", "choices": ["x", "y"], "answer": "A"} for i in range(8)]
open(path, "w").write("".join(json.dumps(r) + "\n" for r in rows)); before = os.stat(path)
first = [q.answer_letter for q in load_questions(path)]
open(path, "w").write("".join(json.dumps({**r, "answer": "B"}) + "\n" for r in rows))
os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
print("answers before", "".join(first), "after the rewrite", "".join(q.answer_letter for q in load_questions(path)))
PY
step "18: a model folder without model_type, a registry database that is a folder, a CPL_MASKS_HOME that is a file"
mkdir -p $E/nomodeltype && echo '{"hidden_size": 64}' > $E/nomodeltype/config.json
$CPL split --data $E/split/inject.jsonl --model $E/nomodeltype --out $E/s18d
mkdir -p $E/home-dir/registry.sqlite3 && CPL_MASKS_HOME=$E/home-dir $CPL registry list
echo "a file" > $E/home-file && CPL_MASKS_HOME=$E/home-file $CPL registry list

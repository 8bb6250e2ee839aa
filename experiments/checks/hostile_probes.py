"""Trying to break the tool as a hostile user would: the probes of the "trust nothing" issue, and more.

Each probe runs ``cpl-masks`` in a real process (or the Python API where a user would call it) on a
tiny random model, in a scratch folder with its own registry and a fake Hub on loopback, and checks
one promise: a file the tool does not own is never written or truncated, a refusal is one line
(``error: ...``, exit status 2, no traceback), a file from a stranger is never trusted beyond what
was verified. It prints one row per probe (held / BROKEN, and what was seen) and exits 1 if any broke.

    .venv/bin/python experiments/checks/hostile_probes.py [--keep SCRATCH] [--only N,N]

About two minutes on 2 cores. Probes 1-26 are the issue's list; 27 and up are new ones on the same
classes of defect.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the tests' tiny model and fake Hub

from tests.conftest import build_tiny_model, make_questions, write_rows  # noqa: E402
from tests.fake_hub import TOKEN, FakeHubServer  # noqa: E402

CLI = [str(ROOT / ".venv" / "bin" / "cpl-masks")]
PYTHON = str(ROOT / ".venv" / "bin" / "python")
VICTIM_TEXT = "a file the tool must never touch\n"


@dataclass
class Scratch:
    """The probes' shared world: a folder, a tiny model, question files, a mask, a registry, a fake Hub."""

    folder: Path
    hub: FakeHubServer
    env: dict[str, str] = field(default_factory=dict)
    model: Path = Path()
    inject: Path = Path()
    mastered: Path = Path()
    mask: Path = Path()
    retain: Path = Path()

    def path(self, name: str) -> Path:
        """A fresh path in the scratch folder."""
        return self.folder / name

    def victim(self, name: str = "victim.txt") -> Path:
        """A file of the user's that no command may write."""
        path = self.path(name)
        path.write_text(VICTIM_TEXT)
        return path

    def cli(self, *args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """``cpl-masks ARGS`` in its own process, on the scratch registry and Hub."""
        command = [*CLI, *(str(arg) for arg in args)]
        return subprocess.run(command, capture_output=True, text=True, env=self.env, input=stdin, timeout=600)

    def python(self, code: str) -> subprocess.CompletedProcess[str]:
        """A Python snippet, as a user's script would run it."""
        return subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=self.env, timeout=600)

    def train(self, out: Path | str, *extra: str | Path) -> subprocess.CompletedProcess[str]:
        """One epoch on the scratch questions (a few seconds); ``extra`` picks the method."""
        return self.cli(*train_argv(self, out, *extra)[1:])


def refused(result: subprocess.CompletedProcess[str], *words: str) -> str | None:
    """None when ``result`` is a one-line refusal (exit 2, ``error: ...``, no traceback) holding ``words``."""
    lines = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and not line.startswith("warning:") and "━" not in line  # progress bars
    ]
    if result.returncode != 2 or "Traceback" in result.stderr + result.stdout:
        return f"exit {result.returncode}: {(result.stderr.strip().splitlines() or [''])[-1][:160]}"
    if len(lines) != 1 or not lines[0].startswith("error:"):
        return f"not one error line: {lines[:3]}"
    missing = [word for word in words if word not in lines[0]]
    return f"error line lacks {missing}: {lines[0][:160]}" if missing else None


def intact(path: Path, text: str = VICTIM_TEXT) -> str | None:
    """None when the file at ``path`` still holds ``text`` and is what it was (not replaced by a link)."""
    if path.is_symlink() or not path.is_file() or path.read_text() != text:
        return f"{path.name} was changed"
    return None


def first(*problems: str | None) -> str | None:
    """The first problem found, or None."""
    return next((problem for problem in problems if problem), None)


PROBES: list[tuple[int, str, Callable[[Scratch], str | None]]] = []


def probe(number: int, title: str) -> Callable[[Callable[[Scratch], str | None]], Callable[[Scratch], str | None]]:
    """Register a probe: it returns None when the promise held, else what it saw."""

    def register(check: Callable[[Scratch], str | None]) -> Callable[[Scratch], str | None]:
        PROBES.append((number, title, check))
        return check

    return register


# --- security -------------------------------------------------------------------------------------------


@probe(1, "a .lock symlinked to a user's file (train, --resume, sweep)")
def symlinked_lock(s: Scratch) -> str | None:
    problems = []
    for name, run in (
        ("train", lambda out: s.train(out)),
        ("resume", lambda out: s.cli("train", "--resume", out)),
        ("sweep", lambda out: s.cli("sweep", "--model", s.model, "--data", s.inject, "--out", out)),
    ):
        out, victim = s.path(f"locked-{name}"), s.victim(f"victim-{name}.txt")
        out.mkdir()
        (out / ".lock").symlink_to(victim)
        run(out)
        problems.append(intact(victim))
    return first(*problems)


@probe(2, "a registry name whose stored file was changed never falls back to the Hub")
def no_hub_fallback(s: Scratch) -> str | None:
    name = registered_name(s, s.mask).split("@")[0]
    pushed = s.cli("push", name, "--repo-id", name)  # a stranger's repo under the same id
    if pushed.returncode != 0:
        return f"set-up: push failed: {pushed.stderr.strip()[-160:]}"
    stored = stored_path(s, name)
    flip_last_byte(stored)
    try:
        loaded = s.python(f"from cpl_masks import Mask\nMask.from_ref({name!r})")
    finally:
        flip_last_byte(stored)
    if loaded.returncode == 0:
        return "from_ref returned a mask for a name whose stored file fails its check"
    return None if "CplError" in loaded.stderr else f"not a CplError: {loaded.stderr.strip()[-160:]}"


@probe(3, "a retain set's id covers its questions")
def retain_id_covers_questions(s: Scratch) -> str | None:
    code = f"""
from cpl_masks import Mask
retain = Mask.load({str(s.retain)!r})
metadata = dict(retain.metadata)
retain_section = dict(metadata["retain"])
questions = [dict(q) for q in retain_section["questions"]]
questions[0]["question"] += " (edited)"
retain_section["questions"] = questions
metadata["retain"] = retain_section
edited = Mask.from_signs(retain.signs(), metadata)
print(edited.id != retain.id)
"""
    result = s.python(code)
    if result.returncode != 0:
        return f"could not edit the retain set: {result.stderr.strip()[-200:]}"
    return None if result.stdout.strip() == "True" else "same id with other questions"


@probe(4, "a stored copy changed after registration is caught by registry verify")
def verify_stored_copy(s: Scratch) -> str | None:
    name = registered_name(s, s.mask)
    path = stored_path(s, name)
    flip_last_byte(path)
    try:
        result = s.cli("registry", "verify")
    finally:
        flip_last_byte(path)
    return None if result.returncode == 1 and path.name[:12] in result.stdout + result.stderr else "not reported"


@probe(5, "pulled names are injective: a/b.c and a.b/c")
def pulled_names(s: Scratch) -> str | None:
    name = registered_name(s, s.mask)
    for repo in ("probe/b.c", "probe.b/c"):
        pushed = s.cli("push", name, "--repo-id", repo)
        if pushed.returncode != 0:
            return f"set-up: push {repo}: {pushed.stderr.strip()[-160:]}"
    first_pull, second_pull = s.cli("pull", "probe/b.c"), s.cli("pull", "probe.b/c")
    if first_pull.returncode != 0:
        return f"pull probe/b.c failed: {first_pull.stderr.strip()[-160:]}"
    if second_pull.returncode == 2:
        return None  # a refused collision is allowed
    names = {
        row["name"] for row in json.loads(s.cli("registry", "list", "--json").stdout) if "/hub.probe" in row["name"]
    }
    return None if len(names) >= 2 else f"one name for two repos: {sorted(names)}"


@probe(6, "untrusted mask metadata is escaped in the pushed model card")
def card_escaped(s: Scratch) -> str | None:
    result = s.python(
        "from cpl_masks.hub import model_card\n"
        "from cpl_masks import Mask\n"
        f"mask = Mask.load({str(s.mask)!r})\n"
        "mask.metadata['task'] = 'x | [click](http://evil.example) <img src=x>\\n| injected |'\n"
        "print(model_card(mask, 'name@v1', 'owner/repo'))\n"
    )
    if result.returncode != 0:
        return f"card not built: {result.stderr.strip()[-200:]}"
    card = result.stdout
    live = [mark for mark in (r"(?<!\\)\]\(http://evil", r"(?<!\\)<img", r"\n\| injected \|") if re.search(mark, card)]
    return f"raw markup in the card: {live}" if live else None


# --- data loss and writes where they do not belong ----------------------------------------------------------


@probe(7, "profile never writes into the model folder, even with --overwrite")
def profile_into_model(s: Scratch) -> str | None:
    weights = s.model / "model.safetensors"
    before = weights.read_bytes()
    questions = ["--mastered", s.mastered, "--inject", s.inject]
    problems = [
        refused(s.cli("profile", *questions, "--model", s.model, "--out", weights, "--overwrite")),
        refused(
            s.cli("profile", "--kind", "retain", *questions[:2], "--model", s.model, "--out", weights, "--overwrite")
        ),
        refused(
            s.cli(
                "profile",
                "--rule",
                "gradient-magnitude",
                "--like",
                s.mask,
                *questions[2:],
                "--model",
                s.model,
                "-o",
                s.model / "tokenizer.json",
                "--overwrite",
            )
        ),
    ]
    return first(*problems, None if weights.read_bytes() == before else "model weights replaced")


@probe(8, "registry gc never deletes a live registration's staged file")
def gc_during_registration(s: Scratch) -> str | None:
    home = Path(s.env["CPL_MASKS_HOME"])
    staged = home / "masks" / "..incoming-probe.tmp"
    staged.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(s.mask, staged)
    # a registration in progress, as the store knows one: its staged copy, and the store's shared lock held
    hold = f"import fcntl,os,time; fd=os.open({str(staged.parent)!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_SH)"
    holder = subprocess.Popen(
        [PYTHON, "-c", hold + "; print(1, flush=True); time.sleep(30)"], env=s.env, stdout=subprocess.PIPE
    )
    holder.stdout.readline()  # the lock is held
    try:
        s.cli("registry", "gc")
        fresh = staged.is_file()
    finally:
        holder.kill()
        staged.unlink(missing_ok=True)
    return None if fresh else "gc deleted a staged file a process holds"


@probe(9, "sweep --out inside the model folder is refused before anything is written")
def sweep_into_model(s: Scratch) -> str | None:
    before = sorted(path.name for path in s.model.iterdir())
    result = s.cli("sweep", "--model", s.model, "--data", s.inject, "--out", s.model / "sweep")
    after = sorted(path.name for path in s.model.iterdir())
    return first(
        refused(result), None if before == after else f"wrote into the model folder: {set(after) - set(before)}"
    )


# --- tracebacks -----------------------------------------------------------------------------------------------


@probe(10, "a full disk while writing a checkpoint: one line, the previous one intact")
def disk_full(s: Scratch) -> str | None:
    code = f"""
import errno, sys, torch
from cpl_masks.cli.app import app
real = torch.save
def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
torch.save = full
sys.argv = {train_argv(s, s.path("full-disk"))!r}
app()
"""
    return refused(s.python(code))


@probe(11, "an answer of 5,000 digits (JSONL, JSON, CSV, as a string)")
def huge_answer(s: Scratch) -> str | None:
    digits = "9" * 5000
    files = {
        "huge.jsonl": json.dumps(row(answer=0)).replace('"answer": 0', f'"answer": {digits}') + "\n",
        "huge.json": json.dumps([row(answer=digits)]),
        "huge.csv": f'id,question,choices,answer\na,q?,"[""x"", ""y""]",{digits}\n',
    }
    problems = []
    for name, text in files.items():
        path = s.path(name)
        path.write_text(text)
        problems.append(refused(split_of(s, path), name))
    return first(*problems)


@probe(12, "repo ids huggingface_hub rejects are refused in one line")
def bad_repo_ids(s: Scratch) -> str | None:
    name = registered_name(s, s.mask)
    return first(
        refused(s.cli("pull", "a/b..c")),
        refused(s.cli("push", name, "--repo-id", "a/..")),
        refused(s.cli("pull", "a/" + "b" * 200)),
    )


@probe(13, "a damaged run folder on --resume")
def damaged_resume(s: Scratch) -> str | None:
    base = s.path("resume-base")
    s.train(base)
    (base / "run.json").unlink()
    problems = []
    damages = {
        "state-not-json": ("checkpoint/state.json", "{not json"),
        "config-list": ("config.json", "[]"),
        "config-string-request": ("config.json", '{"request": "x"}'),
    }
    for label, (relative, text) in damages.items():
        folder = s.path(f"resume-{label}")
        shutil.copytree(base, folder)
        (folder / relative).write_text(text)
        problems.append(refused(s.cli("train", "--resume", folder), label))
    folder = s.path("resume-truncated")
    shutil.copytree(base, folder)
    checkpoint = next((folder / "checkpoint").glob("trainer-*.pt"))
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    problems.append(refused(s.cli("train", "--resume", folder)))
    return first(*problems)


@probe(14, "registry NAME@v<huge> (SQLite integer overflow)")
def huge_version(s: Scratch) -> str | None:
    name = registered_name(s, s.mask).split("@")[0]
    reference = f"{name}@v99999999999999999999999"
    return first(
        *(refused(s.cli("registry", command, reference)) for command in ("show", "rm")),
        refused(s.cli("inspect", reference)),
    )


@probe(15, "a --track-text that is not UTF-8")
def track_text_not_utf8(s: Scratch) -> str | None:
    text = s.path("latin1.txt")
    text.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    return refused(s.train(s.path("latin1-run"), "--track-text", text), "latin1.txt")


# --- wrong results ------------------------------------------------------------------------------------------


@probe(16, "registry naming follows the file's kind, not a metadata key")
def naming_by_kind(s: Scratch) -> str | None:
    code = f"""
from cpl_masks import Mask
retain = Mask.load({str(s.retain)!r})
metadata = {{key: value for key, value in retain.metadata.items() if key != "retain"}}
stripped = Mask.from_signs(retain.signs(), metadata)
print(stripped.kind)
"""
    kind = s.python(code)
    if kind.returncode != 0:
        return None  # a retain set without its questions does not even build: nothing to misfile
    path = s.path("retain-without-key.safetensors")
    s.python(code.replace("print(stripped.kind)", f"stripped.save({str(path)!r})"))
    added = s.cli("registry", "add", path, "--name", "stripped")
    if added.returncode != 0:
        return None
    shown = s.cli("registry", "list", "--json").stdout
    rows = [row for row in json.loads(shown) if row.get("id", "").startswith(mask_id(s, path))]
    return None if all(row["name"].endswith(".retain") for row in rows) else f"filed as {[row['name'] for row in rows]}"


@probe(17, "padding bits of a packed plane are checked")
def padding_bits(s: Scratch) -> str | None:
    path = s.path("padded.safetensors")
    code = f"""
import torch
from cpl_masks import Mask
mask = Mask.from_bool({{"w": torch.tensor([True, False, True])}}, {{"task": "pad"}})
mask.save({str(path)!r})
"""
    made = s.python(code)
    if made.returncode != 0:
        return f"set-up: {made.stderr.strip()[-160:]}"
    raw = bytearray(path.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    raw[8 + header] = 0xFF  # the one packed byte: 3 real bits, 5 padding bits
    path.write_bytes(bytes(raw))
    return refused(s.cli("inspect", path))


@probe(18, "choices [null, 'paris'] are refused, not read as 'None'")
def null_choice(s: Scratch) -> str | None:
    return split_refuses(s, "null.jsonl", [row(choices=[None, "paris"], answer=1)])


@probe(19, "touched: Infinity in a header is refused; inspect --json is always JSON")
def infinite_touched(s: Scratch) -> str | None:
    path = with_metadata_edit(s, "infinite.safetensors", '"touched": ', '"touched": Infinity, "was": ')
    result = s.cli("inspect", path, "--json")
    if result.returncode == 0:
        try:
            json.loads(result.stdout, parse_constant=lambda constant: (_ for _ in ()).throw(ValueError(constant)))
        except ValueError as error:
            return f"inspect --json printed non-JSON: {error}"
        return None
    return refused(result)


@probe(20, "an empty --track-text")
def empty_track_text(s: Scratch) -> str | None:
    empty = s.path("empty.txt")
    empty.write_text("")
    out = s.path("empty-text-run")
    result = s.train(out, "--track-text", empty)
    if result.returncode == 0:
        metrics = (out / "metrics.jsonl").read_text()
        return "NaN in metrics.jsonl" if "NaN" in metrics else None
    return refused(result, "empty.txt")


# --- minor ------------------------------------------------------------------------------------------------


@probe(21, "a bad scoring inside a mask's metadata says where it came from")
def scoring_from_mask(s: Scratch) -> str | None:
    path = with_metadata_edit(s, "bad-scoring.safetensors", '"scoring": "letter"', '"scoring": "bogus"')
    result = s.train(s.path("bad-scoring-run"), "--mask", path)
    problem = refused(result, "bogus")
    if problem:
        return problem
    return "blames --scoring, which was not given" if "--scoring bogus" in result.stderr else None


@probe(22, "SIGTERM before config.json exists prints no resume hint that fails")
def early_sigterm(s: Scratch) -> str | None:
    out = s.path("early-term")
    command = [*CLI, *train_argv(s, out)[1:]]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=s.env)
    for _ in range(200):  # until the folder exists, before config.json
        if out.exists():
            break
        subprocess.run(["sleep", "0.02"], check=False)
    process.terminate()
    _, stderr = process.communicate(timeout=120)
    if (out / "config.json").exists() or "resume with" not in stderr:
        return None
    resumed = s.cli("train", "--resume", out)
    return None if resumed.returncode == 0 else f"the hint fails: {resumed.stderr.strip()[-160:]}"


@probe(23, "kill -9 leftovers are not listed as misplaced valid masks, and gc collects them")
def dead_staged_files(s: Scratch) -> str | None:
    home = Path(s.env["CPL_MASKS_HOME"])
    staged = home / "masks" / "..incoming-dead.tmp"
    staged.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(s.mask, staged)
    os.utime(staged, (0, 0))  # long dead
    s.cli("registry", "gc")
    return None if not staged.exists() else "gc kept a dead staged file"


@probe(24, "a run's model.safetensors follows the umask")
def model_mode(s: Scratch) -> str | None:
    out = s.path("umask-run")
    code = f"""
import os, sys
os.umask(0o002)
from cpl_masks.cli.app import app
sys.argv = {train_argv(s, out)!r}
app()
"""
    s.python(code)
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in (out / "model").iterdir()}
    wrong = {name: mode for name, mode in modes.items() if mode != "0o664"}
    return f"modes not 664: {wrong}" if wrong else None


@probe(25, "a 5 MB id is refused")
def huge_id(s: Scratch) -> str | None:
    return split_refuses(s, "long-id.jsonl", [row(id="x" * 5_000_000)])


@probe(26, "a broken retain: set in a sweep is refused before the split")
def sweep_broken_retain(s: Scratch) -> str | None:
    broken = s.path("broken-retain.safetensors")
    broken.write_bytes(b"not a mask")
    out = s.path("sweep-broken")
    result = s.cli("sweep", "--model", s.model, "--data", s.inject, "--methods", f"full,retain:{broken}", "--out", out)
    return first(refused(result), None if not (out / "split").exists() else "the split was made first")


# --- new probes on the same classes -------------------------------------------------------------------------


@probe(27, "a run folder whose metrics.jsonl links to a user's file, with --overwrite")
def symlinked_record(s: Scratch) -> str | None:
    out, victim = s.path("linked-record"), s.victim("victim-record.txt")
    out.mkdir()
    (out / "metrics.jsonl").symlink_to(victim)
    s.train(out, "--overwrite")
    return intact(victim)


@probe(28, "a registry home whose database links to a user's file")
def symlinked_registry(s: Scratch) -> str | None:
    home, victim = s.path("linked-home"), s.victim("victim-db.txt")
    home.mkdir()
    (home / "registry.sqlite3").symlink_to(victim)
    env = {**s.env, "CPL_MASKS_HOME": str(home)}
    subprocess.run(
        [*CLI, "registry", "add", str(s.mask), "--name", "linked"], capture_output=True, env=env, check=False
    )
    return intact(victim)


@probe(29, "split and train --out inside the model folder are refused")
def outputs_into_model(s: Scratch) -> str | None:
    return first(
        refused(s.cli("split", "--data", s.inject, "--model", s.model, "--out", s.model / "split")),
        refused(s.train(s.model / "run")),
    )


@probe(30, "compare --plot onto the model's config.json, with --overwrite")
def plot_into_model(s: Scratch) -> str | None:
    run = s.path("plot-run")
    s.train(run)
    config = s.model / "config.json"
    before = config.read_bytes()
    result = s.cli("compare", run, "--plot", config, "--overwrite")
    return first(refused(result), None if config.read_bytes() == before else "config.json replaced")


@probe(31, "answers that are not whole numbers or letters (1e400, 1.5, -1, true)")
def odd_answers(s: Scratch) -> str | None:
    answers = ("1e400", 1.5, -1, True)
    return first(*(split_refuses(s, f"answer-{index}.jsonl", [row(answer=a)]) for index, a in enumerate(answers)))


@probe(32, "a choice that is an object, and a question that is a number")
def odd_fields(s: Scratch) -> str | None:
    return first(
        split_refuses(s, "object-choice.jsonl", [row(choices=[{"text": "x"}, "y"])]),
        split_refuses(s, "number-question.jsonl", [row(question=42)]),
    )


@probe(33, "registry references of every odd shape (long, @v-1, @v0x10, @v1e3, control characters)")
def odd_references(s: Scratch) -> str | None:
    name = registered_name(s, s.mask).split("@")[0]
    references = [name + suffix for suffix in ("@v-1", "@v0x10", "@v1e3", "@v", "@v1@v2")] + [
        "x" * 100_000,
        "a\x1b[31mb",
    ]
    problems = []
    for reference in references:
        result = s.cli("registry", "show", reference)
        if result.returncode != 0:
            problems.append(refused(result))
    return first(*problems)


@probe(34, "pull with a hostile revision (long, ../, spaces)")
def odd_revisions(s: Scratch) -> str | None:
    return first(*(refused(s.cli("pull", f"probe/x@{revision}")) for revision in ("r" * 300, "../../etc", "a b")))


@probe(35, "a mask whose header claims a share above 1 or a NaN")
def odd_shares(s: Scratch) -> str | None:
    path = with_metadata_edit(s, "nan.safetensors", '"touched": ', '"touched": NaN, "was": ')
    result = s.cli("inspect", path, "--json")
    if result.returncode == 0:
        return "NaN printed" if "NaN" in result.stdout else None
    return refused(result)


@probe(36, "--track-text that is a folder, or a binary file")
def odd_track_texts(s: Scratch) -> str | None:
    binary = s.path("binary.bin")
    binary.write_bytes(bytes(range(256)) * 4)
    return first(
        refused(s.train(s.path("folder-text-run"), "--track-text", s.folder)),
        refused(s.train(s.path("binary-text-run"), "--track-text", binary)),
    )


@probe(37, "--resume of a folder whose config.json names a missing mask file, or a number as a path")
def resume_odd_config(s: Scratch) -> str | None:
    base = s.path("resume-odd")
    s.train(base)
    (base / "run.json").unlink()
    config = json.loads((base / "config.json").read_text())
    problems = []
    for label, change in {"number-inject": ("inject", 5), "missing-model": ("model", "/nonexistent/model")}.items():
        folder = s.path(f"resume-odd-{label}")
        shutil.copytree(base, folder)
        edited = json.loads(json.dumps(config))
        edited["request"][change[0]] = change[1]
        (folder / "config.json").write_text(json.dumps(edited))
        problems.append(refused(s.cli("train", "--resume", folder)))
    return first(*problems)


@probe(38, "registry add of a file that is not a mask, and of a folder")
def registry_add_odd(s: Scratch) -> str | None:
    text = s.path("not-a-mask.safetensors")
    text.write_text("hello")
    return first(refused(s.cli("registry", "add", text)), refused(s.cli("registry", "add", s.folder)))


# --- helpers ------------------------------------------------------------------------------------------------


def train_argv(s: Scratch, out: Path | str, *extra: str | Path) -> list[str]:
    """``sys.argv`` of one epoch of training on the scratch questions into ``out`` (plain fine-tuning by default)."""
    method = [] if {"--method", "--mask", "--retain"} & {str(arg) for arg in extra} else ["--method", "full"]
    common = ["--inject", s.inject, "--mastered", s.mastered, "--model", s.model, "--epochs", "1", "--lr", "0.01"]
    return [str(arg) for arg in ("cpl-masks", "train", *common, "--threads", "1", "--out", out, *method, *extra)]


def row(**changes: object) -> dict[str, object]:
    """A valid question row with ``changes``."""
    return {"id": "a", "question": "q?", "choices": ["x", "y"], "answer": 0, **changes}


def split_of(s: Scratch, path: Path) -> subprocess.CompletedProcess[str]:
    """``cpl-masks split`` of the question file at ``path`` into a fresh folder."""
    return s.cli("split", "--data", path, "--model", s.model, "--out", s.path(path.name + "-split"))


def split_refuses(s: Scratch, name: str, rows: list[dict[str, object]]) -> str | None:
    """None when splitting a JSONL file of ``rows`` is a one-line refusal naming the file."""
    return refused(split_of(s, write_rows(s.path(name), rows)), name)


def with_metadata_edit(s: Scratch, name: str, old: str, new: str) -> Path:
    """A copy of the scratch mask whose metadata (a JSON string inside the header) has its first ``old``
    replaced by ``new``; refuses to return a copy the edit did not change."""
    escaped = [text.replace('"', '\\"') for text in (old, new)]

    def edit(header: str) -> str:
        if escaped[0] not in header:
            raise AssertionError(f"the metadata holds no {old!r}")
        return header.replace(escaped[0], escaped[1], 1)

    return rewrite_header(s, s.mask, name, edit)


def stored_path(s: Scratch, name: str) -> Path:
    """Where the registry stores the mask registered as ``name``."""
    mask_id = json.loads(s.cli("registry", "show", name, "--json").stdout)["id"]
    return Path(s.env["CPL_MASKS_HOME"]) / "masks" / mask_id[:2] / f"{mask_id}.safetensors"


def flip_last_byte(path: Path) -> None:
    """Invert the last byte of the file at ``path`` (a second call restores it)."""
    path.chmod(0o644)
    with path.open("r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)[0]
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last ^ 0xFF]))


def registered_name(s: Scratch, path: Path) -> str:
    """The registry name@version of the mask at ``path`` (registered while the scratch was set up)."""
    shown = json.loads(s.cli("registry", "show", path, "--json").stdout)
    return f"{shown['name']}@v{shown['version']}"


def mask_id(s: Scratch, path: Path) -> str:
    """The content id of the mask file at ``path``."""
    return s.python(f"from cpl_masks import Mask; print(Mask.load({str(path)!r}).id)").stdout.strip()


def rewrite_header(s: Scratch, source: Path, name: str, edit: Callable[[str], str]) -> Path:
    """A copy of ``source`` whose JSON header text is edited as given (the tensors kept, the length fixed)."""
    raw = source.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = edit(raw[8 : 8 + length].decode())
    encoded = header.encode()
    encoded += b" " * (-len(encoded) % 8)
    path = s.path(name)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + raw[8 + length :])
    return path


def set_up(folder: Path, hub: FakeHubServer) -> Scratch:
    """The tiny model, questions, a profiled mask and a retain set, all registered in the scratch registry."""
    s = Scratch(folder=folder, hub=hub)
    s.env = {
        **os.environ,
        "CPL_MASKS_HOME": str(folder / "home"),
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": TOKEN,
        "HF_HUB_CACHE": str(folder / "hub-cache"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    s.model = build_tiny_model(folder / "model")
    s.inject = write_rows(folder / "inject.jsonl", [q.to_record() for q in make_questions(6, 31, "i")])
    s.mastered = write_rows(folder / "mastered.jsonl", [q.to_record() for q in make_questions(6, 32, "m")])
    s.mask = folder / "mask.safetensors"
    s.retain = folder / "retain.safetensors"
    common = ["--model", s.model, "--name", "probe", "--scoring", "letter"]
    for command in (
        ["profile", "--mastered", s.mastered, "--inject", s.inject, *common, "--out", s.mask],
        ["profile", "--kind", "retain", "--mastered", s.mastered, *common, "--out", s.retain],
    ):
        made = s.cli(*command)
        if made.returncode != 0:
            raise SystemExit(f"set-up failed: cpl-masks {' '.join(map(str, command))}\n{made.stderr}")
    return s


def main() -> None:
    """Run the probes and print what each saw."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="Scratch folder to use and keep (default: a temporary one).")
    parser.add_argument("--only", help="Comma-separated probe numbers.")
    args = parser.parse_args()
    wanted = {int(number) for number in args.only.split(",")} if args.only else None
    folder = args.keep or Path(tempfile.mkdtemp(prefix="cpl-probes-"))
    folder.mkdir(parents=True, exist_ok=True)
    hub = FakeHubServer()
    broken = 0
    try:
        scratch = set_up(folder, hub)
        for number, title, check in PROBES:
            if wanted is not None and number not in wanted:
                continue
            try:
                problem = check(scratch)
            except Exception as error:  # a probe that cannot run is a finding too
                problem = f"the probe itself failed: {type(error).__name__}: {error}"
            broken += problem is not None
            print(
                f"{number:>3} {'held  ' if problem is None else 'BROKEN'} {title}"
                + (f"\n      {problem}" if problem else "")
            )
    finally:
        hub.close()
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"{broken} broken of {len(PROBES) if wanted is None else len(wanted)}")
    raise SystemExit(1 if broken else 0)


if __name__ == "__main__":
    main()

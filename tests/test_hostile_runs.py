"""A run folder and a sweep trust nothing a file claims, and never leave half a file behind.

A damaged run folder (``config.json``, ``state.json``, ``trainer-N.pt``) is refused on ``--resume`` in one
line naming the file; a full disk while a run writes (a checkpoint, the model, the tokenizer, a record) is one
line, and the previous checkpoint still resumes; every file a run writes follows the umask; a value taken from
a file names the file; the resume hint is printed only when a resume can work; a sweep checks every input it
names before the split.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cpl_masks.cli.app import app
from cpl_masks.errors import CplError
from cpl_masks.sweep.config import SweepConfig
from cpl_masks.sweep.run import run_sweep
from cpl_masks.training.folder import checkpoint_state, saved_config, saved_request
from cpl_masks.training.run import resume_run, start_run
from tests.conftest import make_questions, write_rows
from tests.test_retain import retain  # noqa: F401  (a module fixture: a retain set of the tiny model)
from tests.test_run_guards import quiz_sweep, train_args
from tests.test_train import fresh, make_request, random_mask

runner = CliRunner()
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@pytest.fixture
def run_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    inject = write_rows(data / "inject.jsonl", [q.to_record() for q in make_questions(3, 51, "i")])
    mastered = write_rows(data / "mastered.jsonl", [q.to_record() for q in make_questions(3, 52, "m")])
    return inject, mastered, mastered


def stopped_run(tiny_model_dir, run_files, out: Path) -> Path:
    """A run of two epochs stopped once epoch 1 is checkpointed."""

    def stop(rows):
        if rows[-1]["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        start_run(make_request(tiny_model_dir, run_files, out), on_epoch=stop)
    return out


def one_line_error(result) -> str:
    """The one ``error:`` line of a refused command (exit 2, no traceback)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]  # progress bars aside
    assert len(errors) == 1, result.output
    return errors[0]


@contextlib.contextmanager
def full_disk_for(name: str):
    """Every atomic write of a file named ``name`` fails as on a full disk (at its fsync), others go through."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(f".{name}."):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", fsync)
        yield


# --- defect 10 and its class: a full disk while a run writes --------------------------------------------------


def test_a_full_disk_while_checkpointing_is_one_line_and_the_previous_checkpoint_resumes(
    tiny_model_dir, run_files, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    real_save = torch.save
    saved: list[int] = []

    def full_disk_save(payload, handle, *args, **kwargs):  # the second checkpoint finds the disk full midway
        saved.append(1)
        if len(saved) < 2:
            return real_save(payload, handle, *args, **kwargs)

        class Full:
            written = 0

            def write(self, data):
                if self.written > 100:  # the disk fills up midway
                    raise OSError(errno.ENOSPC, "No space left on device")
                self.written += handle.write(bytes(data))
                return len(data)

            def flush(self):
                pass

        return real_save(payload, Full(), *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_save)
    result = runner.invoke(app, train_args(tiny_model_dir, run_files, out, "--epochs", "3"))
    line = one_line_error(result)
    assert "trainer-2.pt" in line and "no space left on the device" in line
    checkpoint = out / "checkpoint"
    assert sorted(path.name for path in checkpoint.iterdir()) == ["state.json", "trainer-1.pt"]
    assert json.loads((checkpoint / "state.json").read_text())["epoch"] == 1
    monkeypatch.setattr(torch, "save", real_save)
    resumed = runner.invoke(app, ["train", "--resume", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "run.json").read_text())["resumed"] is True


@pytest.mark.parametrize("name", ["state.json", "metrics.jsonl", "questions.jsonl", "curves.png", "run.json"])
def test_a_full_disk_while_writing_a_record_is_one_line_and_nothing_half_written(
    tiny_model_dir, run_files, tmp_path, name
):
    out = tmp_path / "run"
    with full_disk_for(name):
        result = runner.invoke(app, train_args(tiny_model_dir, run_files, out))
    line = one_line_error(result)
    assert name in line and "no space left on the device" in line
    leftovers = [path for path in out.rglob("*") if path.name.endswith(".tmp") or "staging" in path.name]
    assert not leftovers
    if name == "state.json":  # the trainer file it would have named is gone with it
        assert not list((out / "checkpoint").glob("trainer-*.pt"))


@pytest.mark.parametrize("writer", ["model", "tokenizer"])
def test_a_full_disk_while_saving_the_model_is_one_line_and_the_run_resumes(
    tiny_model_dir, run_files, tmp_path, monkeypatch, writer
):
    import transformers

    cls = transformers.PreTrainedModel if writer == "model" else transformers.PreTrainedTokenizerBase
    real = cls.save_pretrained

    def full_disk(self, folder, *args, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "half.bin").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cls, "save_pretrained", full_disk)
    out = tmp_path / "run"
    line = one_line_error(runner.invoke(app, train_args(tiny_model_dir, run_files, out)))
    assert f"{out / 'model'}" in line and "no space left on the device" in line
    assert not (out / "model").exists() and not list(out.glob(".model*")) and not (out / "run.json").exists()
    monkeypatch.setattr(cls, "save_pretrained", real)
    resumed = runner.invoke(app, ["train", "--resume", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert (out / "model" / "model.safetensors").is_file()


# --- defect 24 and its class: every file a run writes follows the umask -------------------------------------------


def test_every_file_of_a_run_follows_the_umask(tiny_model_dir, run_files, tmp_path):
    out = tmp_path / "run"
    previous = os.umask(0o002)
    try:
        result = runner.invoke(app, train_args(tiny_model_dir, run_files, out, "--epochs", "1"))
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    modes = {str(path.relative_to(out)): stat.S_IMODE(path.stat().st_mode) for path in [out, *out.rglob("*")]}
    wrong = {name: oct(mode) for name, mode in modes.items() if mode != (0o775 if (out / name).is_dir() else 0o664)}
    assert "model/model.safetensors" in modes and not wrong


# --- defect 13 and its class: a damaged run folder on --resume ---------------------------------------------------


@pytest.fixture
def stopped(tiny_model_dir, run_files, tmp_path) -> Path:
    return stopped_run(tiny_model_dir, run_files, tmp_path / "run")


DAMAGED = [
    ("config.json", "not json {"),
    ("config.json", "[]"),
    ("config.json", '{"request": "x"}'),
    ("config.json", '{"request": {}}'),
    ("checkpoint/state.json", "not json {"),
    ("checkpoint/state.json", "[]"),
    ("checkpoint/state.json", '{"epoch": "one"}'),
    ("checkpoint/state.json", "TRUNCATE"),
    ("checkpoint/trainer-1.pt", "TRUNCATE"),
    ("checkpoint/trainer-1.pt", "not a checkpoint"),
]


@pytest.mark.parametrize(("name", "content"), DAMAGED)
def test_a_damaged_run_folder_is_refused_in_one_line_naming_the_file(stopped, name, content):
    path = stopped / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2] if content == "TRUNCATE" else content.encode())
    line = one_line_error(runner.invoke(app, ["train", "--resume", str(stopped)]))
    assert Path(name).name in line


def test_a_checkpoint_of_other_contents_is_refused_naming_the_file(stopped):
    checkpoint = stopped / "checkpoint"
    for payload in ({"weights": {}, "optimizer": None, "rng": torch.get_rng_state()}, [1, 2], {"weights": "x"}):
        torch.save(payload, checkpoint / "trainer-1.pt")
        line = one_line_error(runner.invoke(app, ["train", "--resume", str(stopped)]))
        assert "trainer-1.pt" in line
    state = json.loads((checkpoint / "state.json").read_text())
    (checkpoint / "state.json").write_text(json.dumps({**state, "file": "../config.json"}))
    assert "state.json" in one_line_error(runner.invoke(app, ["train", "--resume", str(stopped)]))


def test_a_saved_value_the_run_cannot_take_names_config_json(stopped):
    saved = json.loads((stopped / "config.json").read_text())
    saved["request"]["config"]["epochs"] = -1
    (stopped / "config.json").write_text(json.dumps(saved))
    line = one_line_error(runner.invoke(app, ["train", "--resume", str(stopped)]))
    assert "config.json" in line and "--epochs -1" in line


def _mutations(saved: dict):
    """A valid saved file with one value (at the top, in the request or in its training config) replaced."""
    paths = [(key,) for key in saved]
    for outer in ("request",):
        if isinstance(saved.get(outer), dict):
            paths += [(outer, key) for key in saved[outer]]
            paths += [(outer, "config", key) for key in saved[outer].get("config") or {}]
    return st.tuples(st.sampled_from(paths), JSON)


def _replaced(saved: dict, path: tuple, value) -> dict:
    copy = json.loads(json.dumps(saved))
    target = copy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return copy


@pytest.fixture(scope="module")
def module_run(tiny_model_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("hostile")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CPL_MASKS_HOME", str(tmp / "home"))
        data = tmp / "data"
        data.mkdir()
        inject = write_rows(data / "inject.jsonl", [q.to_record() for q in make_questions(3, 51, "i")])
        mastered = write_rows(data / "mastered.jsonl", [q.to_record() for q in make_questions(3, 52, "m")])
        return stopped_run(tiny_model_dir, (inject, mastered, mastered), tmp / "run")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_json_in_config_json_is_read_or_refused_in_one_line(module_run, tmp_path, data):
    saved = json.loads((module_run / "config.json").read_text())
    content = data.draw(JSON | _mutations(saved).map(lambda change: _replaced(saved, *change)))
    folder = tmp_path / "copy"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(module_run, folder)
    (folder / "config.json").write_text(json.dumps(content))
    try:
        saved_config(folder)
        saved_request(folder)
    except CplError as error:
        assert "\n" not in str(error) and "config.json" in str(error)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_json_in_state_json_is_read_or_refused_in_one_line(module_run, tmp_path, data):
    from cpl_masks.training.evaluation import Baseline

    state = json.loads((module_run / "checkpoint" / "state.json").read_text())
    content = data.draw(JSON | _mutations(state).map(lambda change: _replaced(state, *change)))
    folder = tmp_path / "copy"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(module_run, folder)
    (folder / "checkpoint" / "state.json").write_text(json.dumps(content))
    try:
        read = checkpoint_state(folder)
    except CplError as error:
        assert "\n" not in str(error) and "state.json" in str(error)
    else:
        Baseline.from_dict(read["baseline"])
        assert (folder / "checkpoint" / read["file"]).is_file()


# --- defect 21 and its class: a value from a file says where it came from -----------------------------------------


def test_a_bad_scoring_in_a_masks_metadata_names_the_mask_before_the_model_loads(
    tiny_model_dir, run_files, tmp_path, monkeypatch
):
    mask_path = random_mask(fresh(tiny_model_dir).model, scoring="bogus").save(tmp_path / "mask.safetensors")
    monkeypatch.setattr("cpl_masks.training.run.load_model", lambda *a, **k: pytest.fail("the model loaded"))
    request = make_request(tiny_model_dir, run_files, tmp_path / "run", mode=None, mask=str(mask_path))
    with pytest.raises(CplError) as refused:
        start_run(request)
    message = str(refused.value)
    assert not message.startswith("--scoring") and "mask.safetensors" in message and "'bogus'" in message


# --- defect 22: the resume hint only when a resume can work -------------------------------------------------------


def test_an_interrupt_before_config_json_does_not_offer_a_resume(tiny_model_dir, run_files, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("cpl_masks.training.run.load_model", interrupted)
    out = tmp_path / "run"
    result = runner.invoke(app, train_args(tiny_model_dir, run_files, out))
    assert result.exit_code == 130 and not (out / "config.json").exists()
    text = " ".join(result.output.split())
    assert "--resume" not in text and "interrupted" in text and "run the same command again" in text


def test_an_interrupt_after_config_json_offers_the_resume_that_works(tiny_model_dir, run_files, tmp_path, monkeypatch):
    import cpl_masks.training.run as training_run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training_run, "save_checkpoint", interrupted)
    out = tmp_path / "run"
    result = runner.invoke(app, train_args(tiny_model_dir, run_files, out))
    assert result.exit_code == 130
    assert f"resume with: cpl-masks train --resume {out}" in " ".join(result.output.split())
    monkeypatch.undo()
    assert resume_run(out, show_progress=False).metrics[-1]["epoch"] == 2


# --- defect 26 and its class: a sweep checks every input before the split ------------------------------------------


def test_a_broken_retain_set_in_a_sweep_is_refused_before_the_split(tiny_model_dir, tmp_path, monkeypatch, retain):  # noqa: F811
    from cpl_masks.masks.format import Mask

    edited = json.loads(json.dumps(retain.metadata))
    edited["retain"]["questions"][0]["question"] = "something else?"
    broken = Mask(retain.packed, retain.shapes, edited, negative=retain.negative).save(tmp_path / "broken.safetensors")
    monkeypatch.setattr("cpl_masks.sweep.inputs.load_model", lambda *a, **k: pytest.fail("the split started"))
    config = quiz_sweep(tiny_model_dir, tmp_path, [0.01])
    config.methods = ["full", f"retain:{broken}"]
    config.scoring = "letter"
    with pytest.raises(CplError, match="broken.safetensors.*do not match their recorded sha256"):
        run_sweep(config, show_progress=False)
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_file_of_another_scoring_is_refused_before_the_split(tiny_model_dir, tmp_path, monkeypatch):
    mask = random_mask(fresh(tiny_model_dir).model, scoring="letter").save(tmp_path / "other.safetensors")
    monkeypatch.setattr("cpl_masks.sweep.inputs.load_model", lambda *a, **k: pytest.fail("the split started"))
    config = quiz_sweep(tiny_model_dir, tmp_path, [0.01])
    config.methods = ["full", f"reuse:{mask}"]
    with pytest.raises(CplError, match=r"--methods reuse:.*other\.safetensors.*letter"):
        SweepConfig.check(config)

"""Folders from strangers: a planted ``.lock`` and an output pointed into the model's own folder.

A lock file is opened without following links and only ever rewritten when it is a lock file (a
regular file, one link, holding at most a pid); anything else is refused in one line and left as
it is. No command writes into a model folder (the one given as ``--model``, a GGUF file and its
cached copy, or any folder holding a model's config and weights), with or without ``--overwrite``,
and each refuses before anything is written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cpl_masks.cli.app import app
from cpl_masks.errors import CplError
from cpl_masks.utils.files import LOCK_NAME, check_output_dir, check_output_file, folder_holder, lock_folder
from tests.conftest import make_questions, write_rows

PROPERTY = settings(
    max_examples=int(os.environ.get("CPL_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SECRET = b"the victim's own bytes\n" * 4


def cli(*args: str):
    """Invoke the CLI in-process."""
    return CliRunner().invoke(app, list(args))


def error_line(result) -> str:
    """The one-line error, with rich's line breaks undone."""
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    return " ".join(result.output.split())


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny model, so a test that fails on old code never damages the shared one."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_bytes(SECRET)
    return path


# --- defect 1: a planted .lock -------------------------------------------------------------------


def plant(folder: Path, kind: str, victim: Path, payload: bytes = b"") -> None:
    """Put a hostile ``.lock`` of ``kind`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    if kind == "symlink":
        lock.symlink_to(victim)
    elif kind == "dangling symlink":
        lock.symlink_to(folder.parent / "nowhere-yet")
    elif kind == "symlink to a folder":
        lock.symlink_to(victim.parent)
    elif kind == "hard link":
        os.link(victim, lock)
    elif kind == "fifo":
        os.mkfifo(lock)
    elif kind == "folder":
        lock.mkdir()
    elif kind == "other data":
        lock.write_bytes(payload or b"not a pid at all\n" * 8)
    else:
        raise AssertionError(kind)


HOSTILE_LOCKS = ("symlink", "dangling symlink", "symlink to a folder", "hard link", "fifo", "folder", "other data")


@pytest.mark.parametrize("kind", HOSTILE_LOCKS)
def test_lock_folder_refuses_a_lock_that_is_not_a_lock_file_and_leaves_it(tmp_path, victim, kind):
    folder = tmp_path / "r"
    plant(folder, kind, victim)
    with pytest.raises(CplError, match=rf"^{folder / LOCK_NAME}: not a lock file"), lock_folder(folder):
        pass
    assert victim.read_bytes() == SECRET
    assert not (tmp_path / "nowhere-yet").exists()
    assert folder_holder(folder) is None  # a probe never blocks on a fifo, never follows a link


@pytest.mark.parametrize("kind", HOSTILE_LOCKS)
def test_a_folder_with_a_planted_lock_is_not_empty(tmp_path, victim, kind):
    folder = tmp_path / "r"
    plant(folder, kind, victim)
    with pytest.raises(CplError, match="folder is not empty"):
        check_output_dir(folder, overwrite=False)
    assert victim.read_bytes() == SECRET


def test_a_stale_lock_of_ours_is_still_taken(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / LOCK_NAME).write_text("123456\n")
    assert check_output_dir(folder, overwrite=False) == folder  # a stale lock alone: empty
    with lock_folder(folder):
        assert (folder / LOCK_NAME).read_text() == f"{os.getpid()}\n"


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_train_and_sweep_never_truncate_through_a_symlinked_lock(tmp_path, victim, tiny_model_dir, command):
    data = write_rows(tmp_path / "q.jsonl", [q.to_record() for q in make_questions(12)])
    folder = tmp_path / "r"
    plant(folder, "symlink", victim)
    common = ["--model", str(tiny_model_dir), "--out", str(folder), "--threads", "1"]
    if command == "train":
        args = [
            "train",
            "--inject",
            str(data),
            "--mastered",
            str(data),
            "--method",
            "full",
            "--epochs",
            "1",
            *common,
            "--overwrite",
        ]
    else:
        args = ["sweep", "--data", str(data), "--methods", "full", "--lr-grid", "1e-3", "--epochs", "1", *common]
    refused = error_line(cli(*args))
    assert f"{folder / LOCK_NAME}: not a lock file" in refused or "folder is not empty" in refused
    assert victim.read_bytes() == SECRET and sorted(path.name for path in folder.iterdir()) == [LOCK_NAME]


@PROPERTY
@given(kind=st.sampled_from((*HOSTILE_LOCKS, "pid", "empty")), payload=st.binary(max_size=200))
def test_any_planted_lock_is_refused_or_is_a_lock_and_no_victim_changes(kind, payload):
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        victim = root / "victim.txt"
        victim.write_bytes(SECRET + payload)
        folder = root / "r"
        if kind in HOSTILE_LOCKS:
            plant(folder, kind, victim, payload if payload.strip(b"0123456789\n") else b"")
        else:
            folder.mkdir()
            (folder / LOCK_NAME).write_bytes(b"" if kind == "empty" else b"4242\n")
        try:
            with lock_folder(folder):
                taken = True
        except CplError as error:
            assert str(error).startswith(f"{folder / LOCK_NAME}: not a lock file") and "\n" not in str(error)
            taken = False
        assert taken == (kind in ("pid", "empty"))
        assert victim.read_bytes() == SECRET + payload


# --- defects 7 and 9: nothing writes into the model folder ---------------------------------------


def question_files(tmp_path: Path) -> tuple[Path, Path]:
    mastered = write_rows(tmp_path / "mastered.jsonl", [q.to_record() for q in make_questions(6, seed=1)])
    inject = write_rows(tmp_path / "inject.jsonl", [q.to_record() for q in make_questions(6, seed=2)])
    return mastered, inject


@pytest.mark.parametrize("target", ["model.safetensors", "config.json", "new-mask.safetensors"])
def test_profile_never_writes_into_the_model_folder(tmp_path, model_copy, target):
    mastered, inject = question_files(tmp_path)
    before = snapshot(model_copy)
    out = model_copy / target
    for flags in ((), ("--overwrite",)):
        sign = ["profile", "--mastered", str(mastered), "--inject", str(inject), "--model", str(model_copy)]
        refused = error_line(cli(*sign, "--out", str(out), *flags))
        assert f"--out {out}: lies in the model folder {model_copy}" in refused
        retain = ["profile", "--kind", "retain", "--mastered", str(mastered), "--model", str(model_copy)]
        refused = error_line(cli(*retain, "--out", str(out), *flags))
        assert f"--out {out}: lies in the model folder {model_copy}" in refused
    assert snapshot(model_copy) == before


def test_a_control_mask_never_writes_into_the_model_folder(tmp_path, model_copy):
    mastered, inject = question_files(tmp_path)
    like = tmp_path / "like.safetensors"
    made = cli(
        "profile", "--mastered", str(mastered), "--inject", str(inject), "--model", str(model_copy), "-o", str(like)
    )
    assert made.exit_code == 0, made.output
    before = snapshot(model_copy)
    out = model_copy / "tokenizer.json"
    control = ["profile", "--rule", "gradient-magnitude", "--like", str(like), "--inject", str(inject)]
    refused = error_line(cli(*control, "--model", str(model_copy), "-o", str(out), "--overwrite"))
    assert f"--out {out}: lies in the model folder {model_copy}" in refused
    assert snapshot(model_copy) == before


def test_mask_commands_plots_and_runs_never_write_into_a_model_folder(tmp_path, model_copy, tiny_model_dir):
    mastered, inject = question_files(tmp_path)
    mask = tmp_path / "m.safetensors"
    args = ["--mastered", str(mastered), "--inject", str(inject), "--model", str(model_copy), "--save-scores"]
    assert cli("profile", *args, "-o", str(mask)).exit_code == 0
    before = snapshot(model_copy)
    out = model_copy / "model.safetensors"
    for refused in (
        error_line(cli("threshold", str(mask), "--threshold", "0.1", "-o", str(out), "--overwrite")),
        error_line(cli("combine", "--op", "and", str(mask), str(mask), "-o", str(out), "--overwrite")),
        error_line(cli("inspect", str(mask), "--plot", str(model_copy / "shares.png"))),
        error_line(cli("compare", str(tmp_path / "run-a"), "--plot", str(model_copy / "compare.png"))),
        error_line(
            cli(
                "train",
                "--inject",
                str(inject),
                "--mastered",
                str(mastered),
                "--method",
                "full",
                "--epochs",
                "1",
                "--model",
                str(tiny_model_dir),
                "--out",
                str(model_copy / "run"),
                "--threads",
                "1",
            )
        ),
    ):
        assert f"lies in the model folder {model_copy}" in refused
    assert snapshot(model_copy) == before


def test_split_never_writes_into_the_model_folder(tmp_path, model_copy):
    data, _ = question_files(tmp_path)
    before = snapshot(model_copy)
    for out, flags in ((model_copy / "split", ()), (model_copy, ("--overwrite",))):
        refused = error_line(cli("split", "--data", str(data), "--model", str(model_copy), "--out", str(out), *flags))
        assert f"--out {out}: lies in the model folder {model_copy}" in refused
    assert snapshot(model_copy) == before


def test_sweep_into_the_model_folder_is_refused_before_anything_is_written(tmp_path, model_copy):
    data, _ = question_files(tmp_path)
    before = snapshot(model_copy)
    names = sorted(path.name for path in model_copy.iterdir())
    out = model_copy / "sweep"
    sweep = ["sweep", "--data", str(data), "--model", str(model_copy), "--out", str(out), "--threads", "1"]
    refused = error_line(cli(*sweep, "--methods", "full", "--lr-grid", "1e-3", "--epochs", "1"))
    assert f"--out {out}: lies in the model folder {model_copy}" in refused
    assert snapshot(model_copy) == before and sorted(path.name for path in model_copy.iterdir()) == names


def test_a_link_into_the_model_folder_is_followed_by_the_check(tmp_path, model_copy):
    link = tmp_path / "innocent"
    link.symlink_to(model_copy)
    with pytest.raises(CplError, match="lies in the model folder"):
        check_output_file(link / "model.safetensors", overwrite=True)
    with pytest.raises(CplError, match="lies in the model folder"):
        check_output_dir(link / "run", overwrite=True)


def test_a_gguf_model_its_file_and_its_cache_are_never_written(tmp_path, isolated_registry):
    from cpl_masks.models import model_locations

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    locations = model_locations(str(gguf))
    assert gguf.resolve() in [path.resolve() for path in locations]
    with pytest.raises(CplError, match="is this command's input|lies in the model folder"):
        check_output_file(gguf, overwrite=True, inputs=locations)
    cache = isolated_registry / "models" / "gguf-0123456789abcdef"
    with pytest.raises(CplError, match="lies in"):
        check_output_file(cache / "model.safetensors", overwrite=True, inputs=locations)
    assert gguf.read_bytes()[:4] == b"GGUF"


def test_a_local_model_folder_is_where_its_reference_lives(model_copy):
    from cpl_masks.models import model_locations

    assert model_copy.resolve() in [path.resolve() for path in model_locations(str(model_copy))]
    with pytest.raises(CplError, match=f"lies in the model folder {model_copy}"):
        check_output_file(model_copy / "x.bin", overwrite=True, inputs=model_locations(str(model_copy)))


relative_names = st.lists(
    st.text(alphabet=st.characters(min_codepoint=45, max_codepoint=122, exclude_characters="/\\:"), min_size=1)
    .filter(lambda name: name not in (".", ".."))
    .map(lambda name: name[:40]),
    min_size=1,
    max_size=3,
)


@PROPERTY
@given(parts=relative_names, overwrite=st.booleans())
def test_no_path_under_a_model_folder_is_an_acceptable_output(model_copy, parts, overwrite):
    target = model_copy.joinpath(*parts)
    for check in (check_output_file, check_output_dir):
        try:
            check(target, overwrite=overwrite)
        except CplError as error:
            assert "\n" not in str(error)
            assert "lies in the model folder" in str(error) or target.exists()
        else:
            raise AssertionError(f"{target} accepted as an output")


def test_the_registry_never_writes_into_a_model_folder(tmp_path, model_copy, monkeypatch):
    mastered, inject = question_files(tmp_path)
    mask = tmp_path / "m.safetensors"
    args = ["--mastered", str(mastered), "--inject", str(inject), "--model", str(model_copy)]
    assert cli("profile", *args, "-o", str(mask)).exit_code == 0
    before = snapshot(model_copy)
    monkeypatch.setenv("CPL_MASKS_HOME", str(model_copy))
    refused = error_line(cli("registry", "add", str(mask)))
    assert f"lies in the model folder {model_copy}" in refused
    assert snapshot(model_copy) == before

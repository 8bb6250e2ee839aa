"""Output files of profile, combine and threshold: never overwritten without --overwrite, never an input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cpl_masks.cli.app import app
from cpl_masks.errors import CplError
from cpl_masks.masks.format import Mask
from cpl_masks.utils.files import check_output_file
from tests.conftest import make_questions, write_rows


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own empty registry."""
    monkeypatch.setenv("CPL_MASKS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def save_mask(path: Path, seed: int, *, scores: bool = False) -> Path:
    """A small random mask (with scores, for threshold) saved at ``path``."""
    generator = torch.Generator().manual_seed(seed)
    values = {"layer.weight": torch.randn(4, 8, generator=generator)}
    bits = {name: tensor > 0 for name, tensor in values.items()}
    metadata = {"model": {"ref": "org/tiny", "fingerprint": "f" * 64}, "task": "arc", "parents": []}
    return Mask.from_bool(bits, metadata, scores=values if scores else None).save(path)


def cli(*args: str):
    """Invoke the CLI in-process."""
    return CliRunner().invoke(app, list(args))


def error_line(result) -> str:
    """The one-line error, with rich's line breaks undone."""
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    return " ".join(result.output.split())


def test_combine_refuses_an_existing_out_unless_overwrite_and_never_writes_onto_an_input(tmp_path):
    first, second = save_mask(tmp_path / "a.safetensors", 1), save_mask(tmp_path / "b.safetensors", 2)
    target = tmp_path / "both.safetensors"
    target.write_bytes(b"the user's own file")
    refused = error_line(cli("combine", "--op", "and", str(first), str(second), "-o", str(target)))
    assert f"--out {target}: file exists; pass --overwrite to replace it" in refused
    assert target.read_bytes() == b"the user's own file"
    before = first.read_bytes()
    for flags in ((), ("--overwrite",)):
        onto_input = error_line(cli("combine", "--op", "or", str(first), str(second), "-o", str(first), *flags))
        assert f"--out {first}: is this command's input {first}; write to another file" in onto_input
    assert first.read_bytes() == before
    result = cli("combine", "--op", "and", str(first), str(second), "-o", str(target), "--overwrite")
    assert result.exit_code == 0, result.output
    assert Mask.load(target).metadata["parents"] == [Mask.load(first).id, Mask.load(second).id]


def test_threshold_never_writes_onto_its_input_mask_even_named_through_the_registry(tmp_path):
    source = save_mask(tmp_path / "scored.safetensors", 3, scores=True)
    before = source.read_bytes()
    onto_input = error_line(cli("threshold", str(source), "--keep-fraction", "0.5", "-o", str(source), "--overwrite"))
    assert f"is this command's input {source}" in onto_input and source.read_bytes() == before
    registered = cli("threshold", str(source), "--keep-fraction", "0.5")  # lands in the registry only
    assert registered.exit_code == 0, registered.output
    assert "registered as tiny/arc.recut@v1" in registered.output  # a re-cut is not the task's latest version
    stored = cli("registry", "show", "tiny/arc.recut@v1", "--json").output.split('"path": "')[1].split('"')[0]
    refused = error_line(cli("threshold", "tiny/arc.recut@v1", "--threshold", "0.1", "-o", stored, "--overwrite"))
    assert f"--out {stored}: lies in the registry's folder" in refused  # only the registry writes there


def test_profile_refuses_its_question_file_as_out_before_any_model_loads(tmp_path):
    mastered = write_rows(tmp_path / "mastered.jsonl", [q.to_record() for q in make_questions(4)])
    inject = write_rows(tmp_path / "inject.jsonl", [q.to_record() for q in make_questions(4, seed=1)])
    before = inject.read_bytes()
    args = ["profile", "--mastered", str(mastered), "--inject", str(inject), "--model", str(tmp_path / "no-model")]
    onto_input = error_line(cli(*args, "--out", str(inject), "--overwrite"))  # no model exists: the check ran first
    assert f"--out {inject}: is this command's input {inject}" in onto_input and inject.read_bytes() == before
    existing = tmp_path / "mask.safetensors"
    existing.write_bytes(b"keep me")
    assert "file exists; pass --overwrite" in error_line(cli(*args, "--out", str(existing)))
    blocked = tmp_path / "a-file" / "mask.safetensors"
    blocked.parent.write_text("a file where a folder should be")
    assert f"--out {blocked}: cannot be created, {blocked.parent} is a file" in error_line(
        cli(*args, "--out", str(blocked))
    )


def test_check_output_file_accepts_a_new_file_in_a_folder_still_to_create(tmp_path):
    target = tmp_path / "new" / "deeper" / "mask.safetensors"
    assert check_output_file(target, overwrite=False, inputs=[tmp_path / "missing.jsonl", None]) == target
    with pytest.raises(CplError, match="is a folder"):
        check_output_file(tmp_path, overwrite=True)


def test_check_output_file_refuses_a_folder_it_cannot_write_in(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    real_access = os.access  # root may write anywhere, so the folder also reads as unwritable to the check
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    target = locked / "new" / "mask.safetensors"
    with pytest.raises(CplError, match=rf"^--out {target}: cannot write in {locked} \(permission denied\)$"):
        check_output_file(target, overwrite=False)


def test_a_file_created_while_the_command_runs_is_not_replaced_without_overwrite(tmp_path, monkeypatch):
    first, second = save_mask(tmp_path / "a.safetensors", 1), save_mask(tmp_path / "b.safetensors", 2)
    late = tmp_path / "late.safetensors"
    from cpl_masks.cli import masks as mask_commands

    real_combine = mask_commands.combine

    def combine_then_someone_writes(masks, op):
        late.write_bytes(b"written by someone else meanwhile")
        return real_combine(masks, op)

    monkeypatch.setattr(mask_commands, "combine", combine_then_someone_writes)
    refused = error_line(cli("combine", "--op", "and", str(first), str(second), "-o", str(late)))
    assert f"{late}: appeared while this command ran; not replaced" in refused
    assert late.read_bytes() == b"written by someone else meanwhile"
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []  # no temporary left
    replaced = cli("combine", "--op", "and", str(first), str(second), "-o", str(late), "--overwrite")
    assert replaced.exit_code == 0 and Mask.load(late).metadata["parents"]


def test_files_get_the_users_umask_not_0600(tmp_path, home):
    from cpl_masks.registry import Registry
    from cpl_masks.utils.files import write_json

    previous = os.umask(0o022)
    try:
        path = save_mask(tmp_path / "m.safetensors", 1)
        write_json(tmp_path / "x.json", {"a": 1})
        stored = Registry().resolve(Registry().register(path))
        for written in (path, tmp_path / "x.json", stored, home / "registry.sqlite3"):
            assert written.stat().st_mode & 0o777 == 0o644, written
        os.umask(0o077)
        assert save_mask(tmp_path / "private.safetensors", 2).stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(previous)


def test_nothing_but_the_registry_writes_under_its_home(tmp_path, home):
    first, second = save_mask(tmp_path / "a.safetensors", 1), save_mask(tmp_path / "b.safetensors", 2)
    source = save_mask(tmp_path / "scored.safetensors", 3, scores=True)
    assert cli("combine", "--op", "and", str(first), str(second)).exit_code == 0
    other_id = Mask.load(first).id
    assert cli("registry", "add", str(first)).exit_code == 0
    stored = home / "masks" / other_id[:2] / f"{other_id}.safetensors"
    before = stored.read_bytes()
    refused = error_line(cli("threshold", str(source), "--threshold", "0.1", "-o", str(stored), "--overwrite"))
    assert f"--out {stored}: lies in the registry's folder {home}" in refused and stored.read_bytes() == before
    database = home / "registry.sqlite3"
    refused = error_line(cli("combine", "--op", "or", str(first), str(second), "-o", str(database), "--overwrite"))
    assert "lies in the registry's folder" in refused
    assert cli("registry", "list").exit_code == 0  # still readable
    split = error_line(cli("split", "--data", str(tmp_path / "q.jsonl"), "--out", str(home / "split")))
    assert "lies in the registry's folder" in split


def test_split_never_writes_over_its_own_data(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    data = write_rows(folder / "inject.jsonl", [q.to_record() for q in make_questions(24)])
    before = data.read_bytes()
    for flags in ((), ("--overwrite",)):
        refused = error_line(cli("split", "--data", str(data), "--out", str(folder), "--model", "none", *flags))
        assert f"--out {folder}: would write inject.jsonl over this command's input {data}" in refused
    assert data.read_bytes() == before and len(before.splitlines()) == 24


def test_check_output_dir_refuses_an_input_folder_as_out_even_with_overwrite(tmp_path, tiny_model_dir):
    from cpl_masks.utils.files import check_output_dir

    for out in (tiny_model_dir, tiny_model_dir / "run"):
        with pytest.raises(CplError, match="holds or is this command's input"):
            check_output_dir(out, overwrite=True, inputs=[tiny_model_dir])
    (tmp_path / "runs").mkdir()
    data = write_rows(tmp_path / "runs" / "q.jsonl", [q.to_record() for q in make_questions(2)])
    with pytest.raises(CplError, match=f"holds or is this command's input {data}"):
        check_output_dir(tmp_path / "runs", overwrite=True, inputs=[data])
    assert check_output_dir(tmp_path / "elsewhere", overwrite=False, inputs=[tiny_model_dir, data, None])


def test_plots_follow_the_output_rules(tmp_path):
    victim = save_mask(tmp_path / "victim.safetensors", 1)
    before = victim.read_bytes()
    refused = error_line(cli("inspect", str(victim), "--plot", str(victim), "--overwrite"))
    assert f"--plot {victim}: is this command's input {victim}" in refused and victim.read_bytes() == before
    notes = tmp_path / "notes.json"
    notes.write_text('{"keep": true}')
    assert "file exists; pass --overwrite" in error_line(cli("inspect", str(victim), "--plot", str(notes)))
    assert notes.read_text() == '{"keep": true}'
    assert cli("inspect", str(victim), "--plot", str(notes), "--overwrite").exit_code == 0
    assert notes.read_bytes()[:4] == b"\x89PNG"


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch):
    import errno

    first, second = save_mask(tmp_path / "a.safetensors", 1), save_mask(tmp_path / "b.safetensors", 2)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "both.safetensors"
    refused = error_line(cli("combine", "--op", "and", str(first), str(second), "-o", str(out)))
    assert f"{out}: cannot write (no space left on the device); nothing was replaced" in refused
    assert not out.exists() and not [path for path in tmp_path.iterdir() if path.name.startswith(".")]


LOCK_HOLDER = """
import sys, time
from cpl_masks.utils.files import lock_folder
with lock_folder(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_lock_folder_refuses_a_second_writer_and_dies_with_its_process(tmp_path):
    import subprocess
    import sys

    from cpl_masks.utils.files import LOCK_NAME, check_output_dir, lock_folder

    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = rf"^{folder}: another process \(pid {holder.pid}\) is writing this run folder"
        with pytest.raises(CplError, match=refused), lock_folder(folder):
            pass
    finally:
        holder.kill()
        holder.wait()
    with lock_folder(folder) as locked:  # the killed holder left no stale lock
        assert locked == folder and (folder / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(CplError, match="another process"), lock_folder(folder, what="sweep folder"):
            pass  # a second lock in the same process is refused too (flock on another open file)
    assert check_output_dir(folder, overwrite=False)  # the lock file alone does not make the folder non-empty


def test_publishing_without_hard_links_still_never_replaces(tmp_path, monkeypatch):
    import errno

    from cpl_masks.utils.files import atomic_write

    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "out.json"
    with atomic_write(target, replace=False) as handle:
        handle.write("first")
    assert target.read_text() == "first"
    refused = pytest.raises(CplError, match="appeared while this command ran; not replaced")
    with refused, atomic_write(target, replace=False) as handle:
        handle.write("second")
    assert target.read_text() == "first" and sorted(path.name for path in tmp_path.iterdir()) == ["out.json"]

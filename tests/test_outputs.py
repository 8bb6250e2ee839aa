"""Output files of profile, combine and threshold: never overwritten without --overwrite, never an input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cpl_masks.cli.app import app
from cpl_masks.errors import CplError
from cpl_masks.files import check_output_file
from cpl_masks.masks import Mask
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
    assert f"--out {stored}: is this command's input" in refused


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

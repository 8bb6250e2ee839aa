"""A run's folder appears only once the run can start, and a stopped run resumes from anywhere.

Every check (options, output folder, data, mask, model) runs before ``config.json`` is written; a
run stopped before its first checkpoint starts again with the same command; ``--resume`` finds its
files by absolute path and its mask by content id, refuses changed inputs, and takes a new
``--lr`` or ``--epochs``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from cpl_masks.errors import CplError
from cpl_masks.registry import Registry
from cpl_masks.training.folder import restartable
from cpl_masks.training.run import resume_run, start_run
from tests.conftest import make_questions, write_rows
from tests.test_train import fresh, make_request, random_mask, saved_weights

RUN_FILES = (".lock", "config.json", "metrics.jsonl", "questions.jsonl", "curves.png")


@pytest.fixture
def run_files(tmp_path, monkeypatch):
    monkeypatch.setenv("CPL_MASKS_HOME", str(tmp_path / "home"))
    data = tmp_path / "data"
    data.mkdir()
    inject = write_rows(data / "inject.jsonl", [q.to_record() for q in make_questions(3, 51, "i")])
    mastered = write_rows(data / "mastered.jsonl", [q.to_record() for q in make_questions(3, 52, "m")])
    return inject, mastered, mastered


def stop_at(epoch: int):
    """An ``on_epoch`` callback that interrupts the run once ``epoch`` is published."""

    def stop(rows):
        if rows[-1]["epoch"] == epoch:
            raise KeyboardInterrupt

    return stop


def interrupted(request, epoch: int) -> None:
    """Start ``request`` and stop it once ``epoch`` is published (0: before any checkpoint)."""
    with pytest.raises(KeyboardInterrupt):
        start_run(request, on_epoch=stop_at(epoch))


def test_a_refused_run_leaves_no_folder(tiny_model_dir, tiny_base_model_dir, run_files, tmp_path):
    mask_path = random_mask(fresh(tiny_model_dir).model).save(tmp_path / "mask.safetensors")
    out = tmp_path / "run"
    other = make_request(tiny_base_model_dir, run_files, out, mode=None, mask=str(mask_path))
    with pytest.raises(CplError, match="profiled on other weights"):
        start_run(other)  # refused after the model loaded
    assert not out.exists()
    lora = make_request(tiny_model_dir, run_files, out, mode="lora", method_options={"lora_targets": "no_such_proj"})
    with pytest.raises(CplError, match="^--lora-targets no_such_proj: "):
        start_run(lora)  # refused when the method prepares the model
    assert not out.exists()


def test_unwritable_out_is_refused_before_the_model_loads(tiny_model_dir, run_files, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the output folder was checked")

    monkeypatch.setattr("cpl_masks.training.run.load_model", no_model)
    (tmp_path / "notes.txt").write_text("mine")
    blocked = make_request(tiny_model_dir, run_files, tmp_path / "notes.txt" / "run")
    with pytest.raises(CplError, match=r"^--out .*notes\.txt/run: cannot be created, .*notes\.txt is a file$"):
        start_run(blocked)


def test_read_only_out_is_refused_before_the_model_loads(tiny_model_dir, run_files, tmp_path, monkeypatch):
    monkeypatch.setattr("cpl_masks.training.run.load_model", lambda *args, **kwargs: pytest.fail("model loaded"))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    real_access = os.access  # root may write anywhere, so the folder also reads as unwritable to the check
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    with pytest.raises(CplError, match=r"^--out .*locked/run: cannot write in .*locked \(permission denied\)$"):
        start_run(make_request(tiny_model_dir, run_files, locked / "run"))


def test_a_run_stopped_before_its_first_checkpoint_starts_again(tiny_model_dir, run_files, tmp_path):
    out = tmp_path / "run"
    interrupted(make_request(tiny_model_dir, run_files, out), epoch=0)
    assert sorted(path.name for path in out.iterdir()) == sorted(RUN_FILES) and restartable(out)
    run = start_run(make_request(tiny_model_dir, run_files, out))  # the same command, no --overwrite
    assert [row["epoch"] for row in run.metrics] == [0, 1, 2] and not restartable(out)

    other = tmp_path / "other"
    interrupted(make_request(tiny_model_dir, run_files, other), epoch=0)
    (other / "notes.txt").write_text("the user's")
    assert not restartable(other)
    with pytest.raises(CplError, match="folder is not empty; pass --overwrite"):
        start_run(make_request(tiny_model_dir, run_files, other))


def test_resume_before_the_first_checkpoint_starts_from_epoch_zero(tiny_model_dir, run_files, tmp_path):
    out = tmp_path / "run"
    interrupted(make_request(tiny_model_dir, run_files, out), epoch=0)
    run = resume_run(out, show_progress=False)
    assert [row["epoch"] for row in run.metrics] == [0, 1, 2] and not run.resumed


def test_resume_from_another_folder_after_the_home_moved(tiny_model_dir, run_files, tmp_path, monkeypatch):
    mask_path = random_mask(fresh(tiny_model_dir).model).save(tmp_path / "mask.safetensors")
    name = Registry(tmp_path / "home").register(mask_path)
    mask_path.unlink()  # only the registry's copy is left
    inject, mastered, heldout = run_files
    monkeypatch.chdir(inject.parent)  # every path relative to here
    relative = (inject.name, mastered.name, heldout.name)
    interrupted(make_request(tiny_model_dir, relative, "../run", mode=None, mask=name), epoch=1)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["request"]["inject"] == str(inject) and saved["mask_path"].startswith(str(tmp_path / "home"))
    shutil.move(tmp_path / "home", tmp_path / "moved")
    monkeypatch.setenv("CPL_MASKS_HOME", str(tmp_path / "moved"))
    monkeypatch.chdir(tmp_path / "run")
    run = resume_run(".", show_progress=False)
    assert run.resumed and run.mask_path.startswith(str(tmp_path / "moved"))
    assert [row["epoch"] for row in run.metrics] == [0, 1, 2]


def test_resume_refuses_inputs_that_changed_or_are_gone(tiny_model_dir, run_files, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the inputs were checked")

    mask_path = random_mask(fresh(tiny_model_dir).model).save(tmp_path / "mask.safetensors")
    out = tmp_path / "run"
    interrupted(make_request(tiny_model_dir, run_files, out, mode=None, mask=str(mask_path)), epoch=1)
    monkeypatch.setattr("cpl_masks.training.run.load_model", no_model)
    inject = run_files[0]
    original = inject.read_text()
    inject.write_text(original + json.dumps(make_questions(1, 53, "x")[0].to_record()) + "\n")
    with pytest.raises(CplError, match=rf"^--resume {out}: {inject} \(inject\) has changed since the run started"):
        resume_run(out)
    inject.unlink()
    with pytest.raises(CplError, match=rf"^--resume {out}: cannot read the run's data again: {inject}: no such file"):
        resume_run(out)
    inject.write_text(original)
    saved_id = json.loads((out / "config.json").read_text())["mask_id"]
    mask_path.unlink()
    with pytest.raises(CplError, match=rf"^--resume {out}: mask {saved_id[:12]} is no longer at {mask_path} "):
        resume_run(out)


def test_resume_takes_a_new_lr_and_more_epochs(tiny_model_dir, run_files, tmp_path):
    interrupted(make_request(tiny_model_dir, run_files, tmp_path / "same"), epoch=1)
    shutil.copytree(tmp_path / "same", tmp_path / "slower")
    with pytest.raises(CplError, match=r"^--epochs 0: the run has already trained 1; give at least 1$"):
        resume_run(tmp_path / "same", epochs=0)
    with pytest.raises(CplError, match=r"^--lr -1\.0: must be a positive number$"):
        resume_run(tmp_path / "same", lr=-1.0)
    same = resume_run(tmp_path / "same", epochs=3, show_progress=False)
    slower = resume_run(tmp_path / "slower", lr=0.01, epochs=3, show_progress=False)
    assert [row["epoch"] for row in slower.metrics] == [0, 1, 2, 3]
    change = {"at_epoch": 1, "lr": [0.05, 0.01], "epochs": [2, 3]}
    assert slower.resume_changes == [change] and same.resume_changes == [{"at_epoch": 1, "epochs": [2, 3]}]
    saved = json.loads((tmp_path / "slower" / "config.json").read_text())
    assert saved["resume_changes"] == [change] and saved["request"]["config"]["lr"] == 0.01
    assert same.metrics[1] == slower.metrics[1]  # the same first epoch, then different rates
    expected, actual = saved_weights(tmp_path / "same"), saved_weights(tmp_path / "slower")
    assert any(not torch.equal(expected[name], actual[name]) for name in expected)


def test_a_config_without_hashes_still_resumes(tiny_model_dir, run_files, tmp_path):
    out = tmp_path / "run"
    interrupted(make_request(tiny_model_dir, run_files, out), epoch=1)
    saved = json.loads((out / "config.json").read_text())
    old = {"request": saved["request"], "mask_path": saved["mask_path"]}  # what older versions wrote
    (out / "config.json").write_text(json.dumps(old))
    run = resume_run(out, show_progress=False)
    assert run.resumed and [row["epoch"] for row in run.metrics] == [0, 1, 2]

"""A run holds what it writes and what it reads: its folder against a second writer, its inputs against
being written over, its registered mask against removal; an interrupted command says how to go on."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading

import pytest
from typer.testing import CliRunner

from cpl_masks.cli.app import app
from cpl_masks.errors import CplError
from cpl_masks.registry import Registry
from cpl_masks.sweep.config import RunSpec, SweepConfig
from cpl_masks.sweep.run import run_sweep
from cpl_masks.training.run import start_run
from cpl_masks.utils.files import folder_in_use, lock_folder
from tests.conftest import make_questions, write_rows
from tests.test_train import fresh, make_request, random_mask

runner = CliRunner()


@pytest.fixture
def run_files(tmp_path):
    inject = write_rows(tmp_path / "inject.jsonl", [q.to_record() for q in make_questions(3, 41, "i")])
    mastered = write_rows(tmp_path / "mastered.jsonl", [q.to_record() for q in make_questions(3, 42, "m")])
    return inject, mastered, mastered


def test_a_second_writer_of_a_live_run_is_refused(tiny_model_dir, run_files, tmp_path):
    out = tmp_path / "run"
    with lock_folder(out), pytest.raises(CplError, match=r"another process \(pid \d+\) is writing this run folder"):
        start_run(make_request(tiny_model_dir, run_files, out))
    assert not (out / "config.json").exists()
    start_run(make_request(tiny_model_dir, run_files, out))  # the lock went with its holder


def test_a_run_never_writes_over_its_inputs(tiny_model_dir, run_files, tmp_path):
    model_copy = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config = (model_copy / "config.json").read_bytes()
    with pytest.raises(CplError, match="--out"):
        start_run(make_request(model_copy, run_files, model_copy), overwrite=True)
    assert (model_copy / "config.json").read_bytes() == config
    with pytest.raises(CplError, match="--out"):
        start_run(make_request(tiny_model_dir, run_files, run_files[0].parent), overwrite=True)  # the data's folder
    assert json.loads(run_files[0].read_text().splitlines()[0])["id"] == "i0"


def test_a_refused_run_leaves_no_folder_even_after_taking_its_lock(tiny_model_dir, run_files, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(CplError, match="--method nope"):
        start_run(make_request(tiny_model_dir, run_files, out, mode="nope"))
    with pytest.raises(CplError, match="lora-targets"):  # refused once the model loaded, after the lock
        start_run(make_request(tiny_model_dir, run_files, out, mode="lora", method_options={"lora_targets": "nope"}))
    assert not out.exists()


def test_registry_rm_cannot_take_the_mask_of_a_running_train(tiny_model_dir, run_files, tmp_path):
    registry = Registry()
    mask = random_mask(fresh(tiny_model_dir).model)
    name = registry.register(mask, task="guarded")
    refused: list[str] = []

    def try_to_remove(rows):
        if rows[-1]["epoch"] == 1:
            with pytest.raises(CplError) as error:
                registry.remove(mask.id, force=True)
            refused.append(str(error.value))

    run = start_run(
        make_request(tiny_model_dir, run_files, tmp_path / "run", mode=None, mask=name), on_epoch=try_to_remove
    )
    assert refused and run.mask_id == mask.id
    assert registry.remove(mask.id, force=True)  # once the run is over the mask can go


def quiz_sweep(tiny_model_dir, tmp_path, lr_grid: list[float]) -> SweepConfig:
    data = write_rows(tmp_path / "quiz.jsonl", [q.to_record() for q in make_questions(30, seed=5)])
    return SweepConfig(model=str(tiny_model_dir), data=str(data), out=str(tmp_path / "sweep"), methods=["full"],
                       lr_grid=lr_grid, epochs=1, threads=1, holdout_fraction=0.3)  # fmt: skip


def test_processes_share_a_sweep_each_training_the_runs_no_other_is(tiny_model_dir, tmp_path):
    """A run another live process holds is left to it; the summary counts every run finished by anyone, and is
    complete only once all are."""
    config = quiz_sweep(tiny_model_dir, tmp_path, [0.01, 0.02])
    taken = tmp_path / "sweep" / "runs" / RunSpec("full", 0.01, 0).label
    other = contextlib.ExitStack()  # stands for a second process training the first run
    lines: list[str] = []

    def report(line: str) -> None:
        lines.append(line)
        if line.startswith("splitting"):  # the sweep folder exists: take the first run's folder
            other.enter_context(lock_folder(taken))

    payload = run_sweep(config, report=report, show_progress=False)
    assert not payload["complete"] and [run["lr"] for run in payload["runs"]] == [0.02]
    assert any(f"process {os.getpid()} is training it; on to the next" in line for line in lines)
    assert not (taken / "config.json").exists()  # left alone
    assert not json.loads((tmp_path / "sweep" / "sweep.json").read_text())["complete"]

    other.close()  # that process went away without finishing: the next one trains the run
    payload = run_sweep(config, show_progress=False)
    assert payload["complete"] and sorted(run["lr"] for run in payload["runs"]) == [0.01, 0.02]


def test_a_second_sweep_process_waits_while_the_first_writes_the_folder(tiny_model_dir, tmp_path):
    config = quiz_sweep(tiny_model_dir, tmp_path, [0.01])
    holder = contextlib.ExitStack()
    holder.enter_context(lock_folder(tmp_path / "sweep", what="sweep folder"))
    threading.Timer(0.5, holder.close).start()
    lines: list[str] = []
    payload = run_sweep(config, report=lines.append, show_progress=False)
    assert lines[0] == f"waiting for process {os.getpid()}, which is writing the sweep folder {tmp_path / 'sweep'}"
    assert payload["complete"] and len(payload["runs"]) == 1


def train_args(model_dir, run_files, out, *extra: str) -> list[str]:
    inject, mastered, _ = run_files
    return ["train", "--inject", str(inject), "--mastered", str(mastered), "--out", str(out), "--model", str(model_dir),
            "--device", "cpu", "--threads", "1", "--epochs", "2", "--lr", "0.01", "--method", "full",
            *extra]  # fmt: skip


def test_an_interrupted_train_says_how_to_resume_and_resume_takes_repeated_values(
    tiny_model_dir, run_files, tmp_path, monkeypatch
):
    import cpl_masks.training.run as training_run

    out = tmp_path / "run"
    original = training_run.save_checkpoint

    def stop_after_the_first_checkpoint(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(training_run, "save_checkpoint", stop_after_the_first_checkpoint)
    result = runner.invoke(app, train_args(tiny_model_dir, run_files, out, "--seed", "0"))
    assert result.exit_code == 130
    assert f"interrupted; nothing was lost, resume with: cpl-masks train --resume {out}" in " ".join(
        result.output.split()
    )
    monkeypatch.setattr(training_run, "save_checkpoint", original)
    changed = runner.invoke(app, ["train", "--resume", str(out), "--seed", "1"])
    assert changed.exit_code == 2 and "--seed cannot change on --resume" in changed.output
    same = runner.invoke(app, ["train", "--resume", str(out), "--seed", "0", "--inject", str(run_files[0])])
    assert same.exit_code == 0, same.output  # the run's own values, repeated, change nothing
    assert json.loads((out / "run.json").read_text())["resumed"] is True


def test_a_bad_task_name_and_an_existing_compare_plot_are_refused(tiny_model_dir, run_files, tmp_path):
    bad = runner.invoke(app, train_args(tiny_model_dir, run_files, tmp_path / "run", "--task", "a/b"))
    assert bad.exit_code == 2 and "--task 'a/b'" in bad.output and not (tmp_path / "run").exists()
    trained = runner.invoke(app, train_args(tiny_model_dir, run_files, tmp_path / "run"), env={"COLUMNS": "500"})
    assert trained.exit_code == 0 and f"run: {tmp_path / 'run' / 'run.json'}" in trained.output.splitlines()
    notes = tmp_path / "notes.json"
    notes.write_text("mine")
    refused = runner.invoke(app, ["compare", str(tmp_path / "run"), "--plot", str(notes)])
    assert refused.exit_code == 2 and "--plot" in refused.output and notes.read_text() == "mine"
    replaced = runner.invoke(app, ["compare", str(tmp_path / "run"), "--plot", str(notes), "--overwrite"])
    assert replaced.exit_code == 0 and notes.read_bytes()[:4] == b"\x89PNG"


def test_a_live_restartable_run_is_refused_without_being_announced_as_started_again(
    tiny_model_dir, run_files, tmp_path, monkeypatch
):
    monkeypatch.setenv("CPL_MASKS_HOME", str(tmp_path / "home"))
    out = tmp_path / "run"

    def stop_at_epoch_zero(rows):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        start_run(make_request(tiny_model_dir, run_files, out), on_epoch=stop_at_epoch_zero)
    inject, mastered, _ = run_files
    command = ["train", "--model", str(tiny_model_dir), "--method", "full", "--inject", str(inject)]
    command += ["--mastered", str(mastered), "--epochs", "1", "--threads", "1", "--out", str(out)]
    assert not folder_in_use(out)
    with lock_folder(out):
        assert folder_in_use(out)
        result = runner.invoke(app, command)
    assert result.exit_code != 0 and "is writing this run folder" in result.output
    assert "starting it again" not in result.output
    result = runner.invoke(app, command)  # the holder is gone: the stopped run starts again
    assert result.exit_code == 0 and "starting it again" in result.output

"""``cpl-masks train`` and ``cpl-masks compare`` through the Typer app."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cpl_masks.cli.app import app
from tests.conftest import make_questions, write_rows
from tests.test_train import fresh, random_mask

runner = CliRunner()


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setenv("CPL_MASKS_HOME", str(tmp_path / "home"))
    inject = write_rows(tmp_path / "inject.jsonl", [q.to_record() for q in make_questions(3, 31, "i")])
    mastered = write_rows(tmp_path / "mastered.jsonl", [q.to_record() for q in make_questions(3, 32, "m")])
    return inject, mastered


def train_args(model_dir, files, out, *extra: str) -> list[str]:
    inject, mastered = files
    common = ["--model", str(model_dir), "--device", "cpu", "--threads", "1", "--epochs", "1", "--lr", "0.01"]
    return ["train", "--inject", str(inject), "--mastered", str(mastered), "--out", str(out), *common, *extra]


def invoke(args: list[str]):
    return runner.invoke(app, args, catch_exceptions=False)


def test_train_full_and_mask_then_compare(tiny_model_dir, files, tmp_path):
    full = invoke(train_args(tiny_model_dir, files, tmp_path / "full", "--method", "full"))
    assert full.exit_code == 0, full.output
    assert "learned" in full.output and (tmp_path / "full" / "model" / "config.json").is_file()
    mask = random_mask(fresh(tiny_model_dir).model).save(tmp_path / "mask.safetensors")
    masked = invoke(train_args(tiny_model_dir, files, tmp_path / "cpl", "--mask", str(mask), "--optimizer", "adamw"))
    assert masked.exit_code == 0, masked.output
    run = json.loads((tmp_path / "cpl" / "run.json").read_text())
    assert run["mode"] == "mask" and run["args"]["config"]["optimizer"] == "adamw"
    compared = invoke(["compare", str(tmp_path / "full"), str(tmp_path / "cpl"), "--plot", str(tmp_path / "c.png")])
    assert compared.exit_code == 0, compared.output
    lines: dict[str, str] = {}
    for line in compared.output.splitlines():
        if line.startswith("│"):
            lines.setdefault(line.split("│")[1].strip(), line)  # the first table: one row per run
    assert set(lines) == {"full", "cpl"} and "mask" in lines["cpl"]
    assert "paired by question against full" in compared.output
    assert (tmp_path / "c.png").is_file()


def stopped_run(model_dir, files, out, epoch: int) -> None:
    """A run (2 epochs, lr 0.05) interrupted once ``epoch`` is published (0: before any checkpoint)."""
    from cpl_masks.training.run import start_run
    from tests.test_train import make_request

    def stop(rows):
        if rows[-1]["epoch"] == epoch:
            raise KeyboardInterrupt

    inject, mastered = files
    with pytest.raises(KeyboardInterrupt):
        start_run(make_request(model_dir, (inject, mastered, mastered), out), on_epoch=stop)


def test_resume_from_the_cli(tiny_model_dir, files, tmp_path):
    stopped_run(tiny_model_dir, files, tmp_path / "run", epoch=1)
    result = invoke(["train", "--resume", str(tmp_path / "run"), "--lr", "0.02", "--epochs", "3"])
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["resumed"] is True and [row["epoch"] for row in run["metrics"]] == [0, 1, 2, 3]
    assert run["resume_changes"] == [{"at_epoch": 1, "lr": [0.05, 0.02], "epochs": [2, 3]}]


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (("--optimizer", "adamw"), "--optimizer"),
        (("-i", "other.jsonl"), "--inject"),
        (("-d", "other.jsonl"), "--data"),  # the old spelling of --inject
        (("--distributed", "fsdp2"), "--distributed"),
        (("--force",), "--force"),
        (("--lr", "0.01", "--seed", "1"), "--seed"),  # another seed than the run's 0
    ],
)
def test_resume_refuses_options_that_cannot_change(tiny_model_dir, files, tmp_path, extra, flag):
    stopped_run(tiny_model_dir, files, tmp_path / "run", epoch=1)
    result = invoke(["train", "--resume", str(tmp_path / "run"), *extra])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {flag} cannot change on --resume; only --lr and --epochs can"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["resume_changes"] == []


def test_a_run_stopped_before_its_first_checkpoint_starts_again_from_the_cli(tiny_model_dir, files, tmp_path):
    stopped_run(tiny_model_dir, files, tmp_path / "run", epoch=0)
    again = invoke(train_args(tiny_model_dir, files, tmp_path / "run", "--method", "full"))
    assert again.exit_code == 0, again.output
    assert f"{tmp_path / 'run'}: a run that stopped before its first checkpoint; starting it again" in again.output
    assert json.loads((tmp_path / "run" / "run.json").read_text())["args"]["config"]["epochs"] == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ((), "choose how to train"),
        (("--mask", "m.safetensors", "--method", "full"), "exclude each other"),
        (("--method", "mask"), "--method mask needs --mask"),
        (("--method", "sideways"), "--method sideways"),
        (("--method", "full", "--optimizer", "adam"), "--optimizer adam"),
        (("--method", "full", "--epochs", "0"), "--epochs 0"),
        (("--method", "full", "--optimizer", "momentum", "--momentum", "-5"), "--momentum -5.0: must be in [0, 1)"),
        (("--method", "full", "--weight-decay", "nan"), "--weight-decay nan: must be a number of at least 0"),
        (("--mask", "nowhere.safetensors"), "nowhere.safetensors"),
    ],
)
def test_bad_options_are_refused(tiny_model_dir, files, tmp_path, extra, message):
    result = invoke(train_args(tiny_model_dir, files, tmp_path / "out", *extra))
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_old_spellings_still_train_and_warn(tiny_model_dir, files, tmp_path):
    inject, _ = files
    args = train_args(tiny_model_dir, files, tmp_path / "old", "--mode", "full")
    args[args.index("--inject")] = "--data"
    result = invoke(args)
    assert result.exit_code == 0, result.output
    assert "warning: --data is renamed --inject" in result.output
    assert "warning: --mode is renamed --method" in result.output
    run = json.loads((tmp_path / "old" / "run.json").read_text())
    assert run["mode"] == "full" and run["args"]["inject"] == str(inject)


def test_both_spellings_of_one_option_are_refused(tiny_model_dir, files, tmp_path):
    result = invoke(train_args(tiny_model_dir, files, tmp_path / "both", "--method", "full", "--mode", "full"))
    assert result.exit_code == 2
    assert "--mode is the old spelling of --method; give one of them" in result.output
    assert not (tmp_path / "both").exists()


def test_data_and_folder_errors(tiny_model_dir, tiny_base_model_dir, files, tmp_path):
    inject, mastered = files
    missing = invoke(["train", "--inject", str(inject), "--method", "full"])
    assert missing.exit_code == 2 and "--mastered, --out required" in missing.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    no_rows = invoke(train_args(tiny_model_dir, (empty, mastered), tmp_path / "a", "--method", "full"))
    assert no_rows.exit_code == 2 and "empty" in no_rows.output
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    busy = invoke(train_args(tiny_model_dir, files, tmp_path / "busy", "--method", "full"))
    assert busy.exit_code == 2 and "--overwrite" in busy.output
    mask = random_mask(fresh(tiny_model_dir).model).save(tmp_path / "mask.safetensors")
    mismatch = invoke(train_args(tiny_model_dir, files, tmp_path / "b", "--mask", str(mask), "--scoring", "loglik"))
    assert mismatch.exit_code == 2 and "--force" in mismatch.output
    other_weights = random_mask(fresh(tiny_model_dir).model).save(tmp_path / "other.safetensors")
    base = ["--model", str(tiny_base_model_dir), "--mask", str(other_weights)]
    refused = invoke([*train_args(tiny_model_dir, files, tmp_path / "c"), *base])
    assert refused.exit_code == 2 and "profiled on other weights" in refused.output
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()  # refused runs leave no folder
    not_a_run = invoke(["compare", str(tmp_path)])
    assert not_a_run.exit_code == 2 and "run.json" in not_a_run.output

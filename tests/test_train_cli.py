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
    return ["train", "--data", str(inject), "--mastered", str(mastered), "--out", str(out), *common, *extra]


def invoke(args: list[str]):
    return runner.invoke(app, args, catch_exceptions=False)


def test_train_full_and_mask_then_compare(tiny_model_dir, files, tmp_path):
    full = invoke(train_args(tiny_model_dir, files, tmp_path / "full", "--mode", "full"))
    assert full.exit_code == 0, full.output
    assert "learned" in full.output and (tmp_path / "full" / "model" / "config.json").is_file()
    mask = random_mask(fresh(tiny_model_dir).model).save(tmp_path / "mask.safetensors")
    masked = invoke(train_args(tiny_model_dir, files, tmp_path / "cpl", "--mask", str(mask), "--optimizer", "adamw"))
    assert masked.exit_code == 0, masked.output
    run = json.loads((tmp_path / "cpl" / "run.json").read_text())
    assert run["mode"] == "mask" and run["args"]["config"]["optimizer"] == "adamw"
    compared = invoke(["compare", str(tmp_path / "full"), str(tmp_path / "cpl"), "--plot", str(tmp_path / "c.png")])
    assert compared.exit_code == 0, compared.output
    lines = {line.split("│")[1].strip(): line for line in compared.output.splitlines() if line.startswith("│")}
    assert set(lines) == {"full", "cpl"} and "mask" in lines["cpl"]
    assert (tmp_path / "c.png").is_file()


def test_resume_from_the_cli(tiny_model_dir, files, tmp_path):
    from cpl_masks.training_run import start_run
    from tests.test_train import make_request

    def stop(rows):
        if rows[-1]["epoch"] == 1:
            raise KeyboardInterrupt

    inject, mastered = files
    with pytest.raises(KeyboardInterrupt):
        start_run(make_request(tiny_model_dir, (inject, mastered, mastered), tmp_path / "run"), on_epoch=stop)
    result = invoke(["train", "--resume", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "run.json").read_text())["resumed"] is True


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ((), "choose how to train"),
        (("--mask", "m.safetensors", "--mode", "full"), "exclude each other"),
        (("--mode", "mask"), "--mode mask needs --mask"),
        (("--mode", "sideways"), "--mode sideways"),
        (("--mode", "full", "--optimizer", "adam"), "--optimizer adam"),
        (("--mode", "full", "--epochs", "0"), "--epochs 0"),
        (("--mask", "nowhere.safetensors"), "nowhere.safetensors"),
    ],
)
def test_bad_options_are_refused(tiny_model_dir, files, tmp_path, extra, message):
    result = invoke(train_args(tiny_model_dir, files, tmp_path / "out", *extra))
    assert result.exit_code == 2
    assert message in result.output


def test_data_and_folder_errors(tiny_model_dir, files, tmp_path):
    inject, mastered = files
    missing = invoke(["train", "--data", str(inject), "--mode", "full"])
    assert missing.exit_code == 2 and "--mastered, --out required" in missing.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    no_rows = invoke(train_args(tiny_model_dir, (empty, mastered), tmp_path / "a", "--mode", "full"))
    assert no_rows.exit_code == 2 and "empty" in no_rows.output
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    busy = invoke(train_args(tiny_model_dir, files, tmp_path / "busy", "--mode", "full"))
    assert busy.exit_code == 2 and "--overwrite" in busy.output
    mask = random_mask(fresh(tiny_model_dir).model).save(tmp_path / "mask.safetensors")
    mismatch = invoke(train_args(tiny_model_dir, files, tmp_path / "b", "--mask", str(mask), "--scoring", "loglik"))
    assert mismatch.exit_code == 2 and "--force" in mismatch.output
    not_a_run = invoke(["compare", str(tmp_path)])
    assert not_a_run.exit_code == 2 and "run.json" in not_a_run.output

"""The whole main job on the real default model (SmolLM2-135M-Instruct): split, profile, train, registry."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from cpl_masks.cli.app import app
from cpl_masks.masks.format import Mask
from cpl_masks.models import load_model
from tests.helpers import assert_frozen_unchanged, snapshot

runner = CliRunner()


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_split_profile_train_and_registry_on_smollm2(tmp_path, monkeypatch):
    monkeypatch.setenv("CPL_MASKS_HOME", str(tmp_path / "home"))
    split = tmp_path / "split"
    cli("split", "--data", "builtin:demo", "--limit", "12", "--scoring", "loglik", "--out", str(split))
    summary = json.loads((split / "split.json").read_text())
    assert summary["counts"]["mastered"] > 0 and summary["counts"]["inject"] > 0

    mask_path = tmp_path / "mask.safetensors"
    output = cli("profile", "--mastered", str(split / "mastered.jsonl"), "--inject", str(split / "inject.jsonl"),
                 "--name", "facts", "--out", str(mask_path))  # fmt: skip
    assert "smollm2-135m-instruct/facts@v1" in output
    mask = Mask.load(mask_path)
    assert mask.metadata["scoring"] == "loglik"  # taken from split.json
    assert 0.0 < mask.collaborative_share() < 1.0

    run = tmp_path / "run"
    cli("train", "--mask", "smollm2-135m-instruct/facts", "--inject", str(split / "inject.jsonl"),
        "--mastered", str(split / "mastered.jsonl"), "--epochs", "1", "--lr", "1e-3", "--out", str(run))  # fmt: skip
    before = snapshot(load_model().model)
    trained = load_file(str(run / "model" / "model.safetensors"))
    model = load_model().model
    model.load_state_dict(trained, strict=False)
    assert_frozen_unchanged(before, model, mask)
    assert any((before[name] != parameter.detach()).any() for name, parameter in model.named_parameters())

    (used,) = json.loads(cli("registry", "show", "smollm2-135m-instruct/facts", "--json"))["runs"]
    final = json.loads((run / "run.json").read_text())["final"]
    assert (used["task"], used["out_dir"], used["learned"]) == ("facts", str(run), final["learned"])

"""Control masks: random and gradient-magnitude masks with a CPL mask's per-tensor counts."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cpl_masks.cli.app import app
from cpl_masks.errors import CplError
from cpl_masks.masks.format import Mask
from cpl_masks.models import load_model
from cpl_masks.profiling.controls import _largest_bits, gradient_magnitude_mask, random_mask
from cpl_masks.profiling.freeze_mask import profile
from cpl_masks.profiling.selection import Cut
from cpl_masks.registry import Registry
from cpl_masks.scoring.scorers import make_scorer
from tests.conftest import make_questions, write_rows
from tests.helpers import assert_frozen_unchanged, snapshot
from tests.test_profile import reference_gradients

MASTERED = make_questions(6, seed=41, prefix="m")
INJECT = make_questions(5, seed=42, prefix="i")
runner = CliRunner()


@pytest.fixture(scope="module")
def like(tiny) -> Mask:
    """A CPL mask of the tiny model, with the embeddings forced frozen (a tensor of count 0)."""
    rule = Cut(freeze_pattern="embed")
    return profile(tiny, MASTERED, INJECT, cut=rule, batch_size=4, task="facts", show_progress=False)


@pytest.fixture(scope="module")
def magnitude(tiny, like) -> Mask:
    return gradient_magnitude_mask(tiny, INJECT, like, scoring="letter", batch_size=2, show_progress=False)


def assert_same_counts(control: Mask, like: Mask) -> None:
    assert control.shapes == like.shapes
    for name in like.names:
        assert control.collaborative_count(name) == like.collaborative_count(name), name


def assert_control_metadata(control: Mask, like: Mask, kind: str, seed: int | None) -> None:
    meta = control.metadata
    assert meta["model"] == like.metadata["model"]
    assert meta["rule"] == {"control": kind, "like": like.id, "seed": seed}
    assert meta["parents"] == [like.id] and meta["task"] == f"facts-{kind}"
    assert meta["versions"]["torch"] == torch.__version__ and meta["created"]
    assert meta["counts"]["collaborative"] == like.collaborative_count()


def test_random_mask_copies_every_tensor_count(like):
    control = random_mask(like, seed=3)
    assert_same_counts(control, like)
    assert_control_metadata(control, like, "random", 3)
    assert control.metadata["scoring"] == like.metadata["scoring"] and "data" not in control.metadata
    assert control.id != like.id


def test_random_mask_is_seeded(like):
    assert random_mask(like, seed=0).id == random_mask(like, seed=0).id
    assert random_mask(like, seed=0).id != random_mask(like, seed=1).id


def test_gradient_magnitude_keeps_the_largest_injection_gradients(tiny, like, magnitude):
    assert_same_counts(magnitude, like)
    assert_control_metadata(magnitude, like, "gradient-magnitude", None)
    reference = reference_gradients(tiny.model, make_scorer("letter", tiny.tokenizer), INJECT)  # float64 g_I
    partial = 0
    for name in like.names:
        kept = magnitude.collaborative(name)  # (param shape) bool
        if kept.all() or not kept.any():
            continue
        partial += 1
        size = reference[name].abs()  # (param shape) float64 |g_I|
        slack = 1e-5 * float(size.max())  # float32 batches vs a float64 loop
        assert float(size[kept].min()) >= float(size[~kept].max()) - slack, name
    assert partial >= len(like.names) // 2


def test_gradient_magnitude_records_its_data_and_statistics(magnitude):
    meta = magnitude.metadata
    assert meta["scoring"] == "letter" and meta["data"]["inject"]["rows"] == len(INJECT)
    assert "mastered" not in meta["data"]
    assert meta["profile"]["batch_size"] == 2 and meta["profile"]["seconds"] >= 0
    stats = meta["tensors"]["model.embed_tokens.weight"]
    assert stats["touched_collaborative"] == 0 < stats["touched"]  # embeddings: frozen in like, so in the control


def test_ties_go_to_the_lower_index():
    magnitude = torch.tensor([[1.0, 2.0, 2.0], [2.0, 0.0, 3.0]])
    assert _largest_bits(magnitude, 3).tolist() == [[False, True, True], [False, False, True]]
    assert not _largest_bits(magnitude, 0).any() and _largest_bits(magnitude, 6).all()


def test_gradient_magnitude_refuses_other_weights(tiny_base_model_dir, like):
    other = load_model(str(tiny_base_model_dir), device="cpu")
    with pytest.raises(CplError, match="other weights"):
        gradient_magnitude_mask(other, INJECT, like, scoring="letter", show_progress=False)
    with pytest.raises(CplError, match="non-empty"):
        gradient_magnitude_mask(other, [], like, scoring="letter", show_progress=False)


@pytest.fixture
def files(tmp_path, monkeypatch, like):
    monkeypatch.setenv("CPL_MASKS_HOME", str(tmp_path / "home"))
    like_path = like.save(tmp_path / "like.safetensors")
    inject = write_rows(tmp_path / "inject.jsonl", [q.to_record() for q in INJECT])
    mastered = write_rows(tmp_path / "mastered.jsonl", [q.to_record() for q in MASTERED])
    return {"like": like_path, "inject": inject, "mastered": mastered}


def invoke(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def no_model_loads(monkeypatch) -> None:
    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("cpl_masks.cli.profile.load_model", refuse)


def test_cli_random_needs_no_model_and_registers_a_control(files, tmp_path, monkeypatch, like):
    no_model_loads(monkeypatch)
    out = tmp_path / "random.safetensors"
    result = invoke("profile", "--rule", "random", "--like", files["like"], "--seed", "5", "--out", out)
    assert result.exit_code == 0, result.output
    assert "random control" in result.output and "facts-random@v1" in result.output
    control = Mask.load(out)
    assert control.id == random_mask(like, seed=5).id
    registered = result.output.split("registered as")[-1].split()[0]
    shown = invoke("registry", "show", registered, "--json")
    assert shown.exit_code == 0, shown.output
    payload = json.loads(shown.output)
    assert payload["source"] == "control" and payload["parents"][0]["id"] == like.id


def test_cli_gradient_magnitude(files, tiny_model_dir, tmp_path, like, magnitude):
    out = tmp_path / "magnitude.safetensors"
    args = ["--like", files["like"], "--inject", files["inject"], "--batch-size", "2", "--name", "gm"]
    result = invoke("profile", "--rule", "gradient-magnitude", "--model", tiny_model_dir, "--device", "cpu", *args)
    assert result.exit_code == 0, result.output
    assert "gradient-magnitude control" in result.output and "gm@v1" in result.output
    result = invoke("profile", "--rule", "gradient-magnitude", "--model", tiny_model_dir, *args, "--out", out)
    assert result.exit_code == 0, result.output
    control = Mask.load(out)
    assert_same_counts(control, like)
    assert control.metadata["task"] == "gm" and control.metadata["data"]["inject"]["path"] == str(files["inject"])
    assert control.id == magnitude.id


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--rule", "random"), "--rule random needs --like MASK"),
        (("--rule", "gradient-magnitude", "--like", "LIKE"), "--rule gradient-magnitude needs --inject"),
        (("--inject", "INJECT"), "--rule sign needs --mastered"),
        (("--mastered", "MASTERED", "--inject", "INJECT", "--like", "LIKE"), "--like applies only to a control"),
        (("--rule", "random", "--like", "LIKE", "--threshold", "0.1"), "--threshold applies only to --rule sign"),
        (("--rule", "random", "--like", "LIKE", "--save-scores"), "--save-scores applies only to --rule sign"),
        (("--rule", "random", "--like", "LIKE", "--scoring", "loglik"), "the mask was profiled with letter scoring"),
        (("--rule", "random", "--like", "LIKE", "--scoring", "guess"), "--scoring guess: choose one of"),
        (("--rule", "magnitude", "--like", "LIKE"), "--rule magnitude: choose one of sign, random"),
        (("--rule", "random", "--like", "LIKE", "--name", "a/b"), "--name 'a/b'"),
        (("--rule", "random", "--like", "nowhere"), "mask nowhere: no such file"),
        (("--mastered", "MASTERED", "--inject", "INJECT", "--scoring", "guess"), "--scoring guess: choose one of"),
    ],
)
def test_cli_refuses_in_one_line_before_loading_a_model(files, monkeypatch, args, message):
    no_model_loads(monkeypatch)
    names = {"LIKE": files["like"], "INJECT": files["inject"], "MASTERED": files["mastered"]}
    result = invoke("profile", *(names.get(arg, arg) for arg in args))
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_a_control_mask_trains_through_the_mask_path(files, tiny_model_dir, tmp_path, like):
    mask_path = random_mask(like, seed=1).save(tmp_path / "random.safetensors")
    before = snapshot(load_model(str(tiny_model_dir), device="cpu").model)
    train = ["train", "--mask", mask_path, "--inject", files["inject"], "--mastered", files["mastered"]]
    options = ["--model", tiny_model_dir, "--device", "cpu", "--threads", "1", "--epochs", "1", "--lr", "0.05"]
    result = invoke(*train, *options, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert_frozen_unchanged(before, trained, Mask.load(mask_path))
    moved = sum(int((parameter.detach() != before[name]).sum()) for name, parameter in trained.named_parameters())
    assert moved > 0
    assert Registry().show(str(mask_path))["source"] == "control"  # registered by the run, filed as what it is

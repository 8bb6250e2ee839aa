"""examples/sft_trainer_retain.py: TRL's SFTTrainer on chats, steered by a free-form or a multiple-choice retain set."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from cpl_masks.data.demo import chat_rows
from cpl_masks.data.questions import load_questions
from cpl_masks.masks.format import Mask
from cpl_masks.models import load_model
from cpl_masks.profiling.retain import SignMeasure, profile_retain, retain_questions

pytest.importorskip("trl")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sft_trainer_retain.py"
SMALL = ["--limit", "8", "--batch-size", "4", "--max-steps", "3", "--lr", "1e-2"]  # 3 steps of 4 chats


@pytest.fixture(scope="module")
def example() -> ModuleType:
    """The example script, imported as a module so its ``main`` runs in this process."""
    spec = importlib.util.spec_from_file_location("sft_trainer_retain", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(autouse=True)
def offline(monkeypatch) -> None:
    """Nothing here may reach the Hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def initial_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The model's weights before any training, loaded again from its folder."""
    model = load_model(str(model_dir), device="cpu").model
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def test_a_free_form_retain_set_steers_every_step_of_sft(example, tiny_model_dir, tmp_path):
    """No --retain: the example profiles one on builtin:demo-chat's general chats (a random model knows none,
    so all 6 are kept). Never refreshed, its stored signs steer all 3 AdamW steps (no weight decay): every
    entry moves against sign(g_M) or not at all, while plain SFT moves about half of them along it."""
    out = tmp_path / "out"
    args = ["--model", str(tiny_model_dir), "--retain-limit", "6", "--refresh-every", "0", "--out", str(out)]
    result = example.main([*args, *SMALL])

    items = [item for item in load_questions("builtin:demo-chat") if item.id.startswith("general-")][:6]
    stored = Mask.load(out / "general.retain.safetensors")
    assert retain_questions(stored) == items and result.handle.questions == items  # read back from its metadata
    assert stored.metadata["loss_on"] == "completion"
    assert result.trainer.state.global_step == 3 and result.handle.refreshes == 0
    assert len(result.before.losses) == len(result.after.losses) == 6

    signs, before = stored.signs(), initial_weights(tiny_model_dir)
    along = against = 0
    for name, parameter in result.trainer.model.named_parameters():
        moved = (parameter.detach() - before[name]).sign() * signs.sign(name)  # +1: moved along g_M
        along += int((moved > 0).sum())
        against += int((moved < 0).sum())
    assert along == 0  # no step moved an entry up the retained items' loss
    assert against > 10_000  # training did move the model, and the signs were not all zero


def test_a_multiple_choice_retain_set_measured_on_choices_steers_chat_sft(example, tiny_model_dir, tmp_path):
    """An MCQ retain set profiled with objective "choices" steers SFT on a user's ``messages`` JSONL; refreshed
    before every step but the first, each refresh measures the choices' loss again at the new weights, and
    leaves the Trainer's activation checkpointing (SFTConfig's default) on."""
    loaded = load_model(str(tiny_model_dir), device="cpu")
    questions = [q for q in load_questions("builtin:demo") if q.id.startswith("general-")][:6]
    measure = SignMeasure(objective="choices")
    retain = profile_retain(loaded, questions, scoring="loglik", batch_size=4, show_progress=False, measure=measure)
    path = retain.save(tmp_path / "choices.retain.safetensors")
    invented = [row for row in chat_rows() if row["id"].startswith("invented-")][:8]
    chats = [{"messages": [*row["prompt"], *row["completion"]]} for row in invented]  # TRL's messages rows
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in chats))

    args = ["--model", str(tiny_model_dir), "--retain", str(path), "--data", str(data), "--refresh-every", "1"]
    result = example.main([*args, *SMALL, "--out", str(tmp_path / "out")])

    handle, model = result.handle, result.trainer.model
    assert result.trainer.state.global_step == 3 and handle.refreshes == 2
    assert handle.measure.objective == "choices" and handle.questions == questions
    assert model.is_activation_checkpointing  # a refresh's own pass did not switch it off
    stored, before = retain.signs(), initial_weights(tiny_model_dir)
    names = [name for name, _ in model.named_parameters()]
    assert any(not torch.equal(handle.signs.sign(name), stored.sign(name)) for name in names)  # measured again
    assert any(not torch.equal(parameter.detach(), before[name]) for name, parameter in model.named_parameters())
    assert len(result.before.correct) == len(result.after.correct) == 6


def test_profiling_refuses_items_a_retain_set_could_not_read_back(tiny_model_dir):
    """Texts beside conversations would make a file whose every refresh fails: refused before the pass."""
    from cpl_masks.errors import CplError

    loaded = load_model(str(tiny_model_dir), device="cpu")
    texts = load_questions("builtin:demo-completions", limit=2)
    chats = [item for item in load_questions("builtin:demo-chat", limit=4)][2:]
    with pytest.raises(CplError, match="^the retain set's questions: row 3 is a conversation but row 1 is not"):
        profile_retain(loaded, [*texts, *chats], show_progress=False)


@pytest.mark.slow
def test_the_example_runs_on_smollm2(example, tmp_path):
    """The defaults on the real model: a retain set of the general chats it gets right, a few SFT steps."""
    args = ["--retain-limit", "16", "--limit", "8", "--batch-size", "4", "--max-steps", "3", "--refresh-every", "2"]
    result = example.main([*args, "--out", str(tmp_path / "out")])
    assert result.trainer.state.global_step == 3 and result.handle.refreshes == 1
    assert sum(result.before.correct) == len(result.handle.questions) > 0  # only what it knew is retained

"""A mask in someone else's loop: transformers' Trainer, TRL's SFTTrainer, a hand-written loop, the examples."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpl_masks.errors import CplError
from cpl_masks.masks.format import Mask
from cpl_masks.models import model_fingerprint
from cpl_masks.registry import Registry
from tests.conftest import WORDS
from tests.helpers import assert_frozen_unchanged, snapshot

ROOT = Path(__file__).resolve().parents[1]
SEQUENCE = 16  # tokens per training text
TRAIN_ARGS = {  # AdamW with decay, clipping that bites, and accumulation over 2 micro-batches
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "max_steps": 3,
    "learning_rate": 1e-2,
    "weight_decay": 0.1,
    "max_grad_norm": 0.05,
    "optim": "adamw_torch",
    "lr_scheduler_type": "constant",
    "logging_steps": 1,
    "report_to": [],
    "save_strategy": "no",
    "use_cpu": True,
    "disable_tqdm": True,
    "seed": 0,
}


@pytest.fixture
def model(tiny_model_dir):
    """A fresh tiny Llama, in training mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()


@pytest.fixture
def tokenizer(tiny_model_dir):
    """The tiny model's tokenizer, padding with its end-of-text token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def random_mask(model: torch.nn.Module, *, seed: int = 0) -> Mask:
    """Half the entries of most tensors collaborative; the embedding wholly frozen, the final norm wholly trained."""
    generator = torch.Generator().manual_seed(seed)
    bits = {}
    for name, parameter in model.named_parameters():
        bits[name] = torch.rand(parameter.shape, generator=generator) < 0.5  # bool, parameter shape
        if "embed_tokens" in name:
            bits[name][:] = False
        if name == "model.norm.weight":
            bits[name][:] = True
    metadata = {"model": {"ref": "tiny", "fingerprint": model_fingerprint(model)}, "task": "tiny"}
    return Mask.from_bool(bits, metadata)


def texts(count: int = 8) -> list[str]:
    """Short deterministic sentences of the tiny tokenizer's words."""
    return [" ".join(WORDS[(index * 7 + step * 3) % len(WORDS)] for step in range(24)) for index in range(count)]


def token_dataset(tokenizer, count: int = 8) -> list[dict[str, torch.Tensor]]:
    """Fixed-length tokenized texts with labels, which the Trainer's default collator stacks."""
    rows = []
    for text in texts(count):
        ids = torch.tensor(tokenizer(text)["input_ids"][:SEQUENCE])  # (SEQUENCE,)
        assert ids.numel() == SEQUENCE
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def hf_trainer(model, tokenizer, tmp_path):
    """A transformers Trainer over the tiny model with :data:`TRAIN_ARGS`."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), **TRAIN_ARGS)
    return Trainer(model=model, args=args, train_dataset=token_dataset(tokenizer))


def frozen_gradients(model, mask: Mask) -> list[float]:
    """Largest |gradient| at the frozen entries of each tensor that has a gradient."""
    return [
        float(parameter.grad.abs().masked_fill(mask.collaborative(name), 0).max())
        for name, parameter in model.named_parameters()
        if parameter.grad is not None
    ]


def assert_collaborative_changed(before: dict[str, torch.Tensor], model, mask: Mask) -> None:
    """Training moved some collaborative entries of every partly or wholly collaborative weight matrix."""
    for name, parameter in model.named_parameters():
        collaborative = mask.collaborative(name)
        if collaborative.any() and parameter.dim() == 2:
            moved = (parameter.detach() != before[name])[collaborative]
            assert moved.any(), f"{name}: no collaborative entry changed"


def test_frozen_gradients_are_not_zero_without_the_mask(model, tokenizer):
    """The other tests are not vacuous: unmasked, a backward gives frozen entries real gradients."""
    batch = token_dataset(tokenizer, 2)
    inputs = {key: torch.stack([row[key] for row in batch]) for key in batch[0]}
    model(**inputs).loss.backward()
    assert max(frozen_gradients(model, random_mask(model))) > 0


def test_trainer_with_adamw_decay_clipping_and_accumulation_changes_only_collaborative_entries(
    model, tokenizer, tmp_path
):
    mask = random_mask(model)
    before = snapshot(model)
    trainer = hf_trainer(model, tokenizer, tmp_path)
    mask.apply(trainer)
    assert not model.model.embed_tokens.weight.requires_grad  # wholly frozen: no gradient, no optimizer state
    trainer.train()
    assert trainer.state.global_step == TRAIN_ARGS["max_steps"]
    assert_frozen_unchanged(before, model, mask)
    assert_collaborative_changed(before, model, mask)
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper around torch's AdamW
    held = {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}
    assert id(model.model.embed_tokens.weight) not in held


def test_the_clip_norm_is_computed_on_masked_gradients(model, tokenizer, tmp_path, monkeypatch):
    mask = random_mask(model)
    trainer = hf_trainer(model, tokenizer, tmp_path)
    mask.apply(trainer)
    seen = []  # per optimizer step: the norm of the gradients clipping is given
    clip = trainer.accelerator.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        assert max(frozen_gradients(model, mask)) == 0, "clipping saw gradients at frozen entries"
        grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(trainer.accelerator, "clip_grad_norm_", spy)
    trainer.train()
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(seen) == TRAIN_ARGS["max_steps"] and logged == pytest.approx(seen, rel=1e-5)
    assert min(seen) > TRAIN_ARGS["max_grad_norm"]  # the clip did scale these steps


def test_sft_trainer_changes_only_collaborative_entries(model, tokenizer, tmp_path, monkeypatch):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_length=32, bf16=False, **TRAIN_ARGS)
    try:
        trainer = trl.SFTTrainer(
            model=model, args=config, train_dataset=Dataset.from_dict({"text": texts()}), processing_class=tokenizer
        )
    except (OSError, ImportError) as error:  # TRL reaching for the network or an optional extra
        pytest.skip(f"TRL cannot run offline here: {error}")
    mask = random_mask(model)
    before = snapshot(model)
    mask.apply(trainer)
    trainer.train()
    assert trainer.state.global_step == TRAIN_ARGS["max_steps"]
    assert_frozen_unchanged(before, model, mask)
    assert_collaborative_changed(before, model, mask)


@pytest.mark.parametrize("make_optimizer", [torch.optim.AdamW, torch.optim.SGD], ids=["adamw", "sgd"])
def test_a_hand_written_loop_with_its_optimizer(model, tokenizer, make_optimizer):
    mask = random_mask(model)
    before = snapshot(model)
    optimizer = make_optimizer(model.parameters(), lr=1e-2, weight_decay=0.1)
    batch = token_dataset(tokenizer, 4)
    with mask.apply(model, optimizer):
        for _ in range(2):
            for half in (batch[:2], batch[2:]):  # two micro-batches accumulated per step
                inputs = {key: torch.stack([row[key] for row in half]) for key in half[0]}
                (model(**inputs).loss / 2).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            optimizer.step()
            optimizer.zero_grad()
    assert_frozen_unchanged(before, model, mask)
    assert_collaborative_changed(before, model, mask)


def test_without_the_optimizer_weight_decay_would_move_frozen_entries(model, tokenizer):
    """Why the guard exists: masked gradients alone do not stop AdamW's decoupled decay."""
    mask = random_mask(model)
    before = snapshot(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    batch = token_dataset(tokenizer, 2)
    with mask.apply(model):
        model(**{key: torch.stack([row[key] for row in batch]) for key in batch[0]}).loss.backward()
        optimizer.step()
    with pytest.raises(AssertionError, match="bytes of frozen entries changed"):
        assert_frozen_unchanged(before, model, mask)


def test_remove_restores_the_model_the_trainer_and_the_optimizer(model, tokenizer, tmp_path):
    mask = random_mask(model)
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    trainer = hf_trainer(model, tokenizer, tmp_path)
    callbacks = list(trainer.callback_handler.callbacks)
    handle = mask.apply(trainer)
    assert len(trainer.callback_handler.callbacks) == len(callbacks) + 1
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    assert optimizer._optimizer_step_pre_hooks and optimizer._optimizer_step_post_hooks

    handle.remove()
    assert {name: parameter.requires_grad for name, parameter in model.named_parameters()} == flags
    assert not any(getattr(parameter, "_post_accumulate_grad_hooks", None) for parameter in model.parameters())
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    assert trainer.callback_handler.callbacks == callbacks
    model.zero_grad(set_to_none=True)
    batch = token_dataset(tokenizer, 2)
    model(**{key: torch.stack([row[key] for row in batch]) for key in batch[0]}).loss.backward()
    assert max(frozen_gradients(model, mask)) > 0  # gradients flow to frozen entries again
    mask.apply(model, allow_other_weights=True).remove()  # and the (trained) model takes a mask again


def test_apply_refuses_in_one_line(model):
    mask = random_mask(model)
    with mask.apply(model), pytest.raises(CplError, match="already carries mask"):
        mask.apply(model)
    with pytest.raises(CplError, match="expected a torch module or a transformers Trainer"):
        mask.apply("model")
    other = Mask.from_bool({"lm_head.weight": torch.ones(2, 2, dtype=torch.bool)}, {})
    with pytest.raises(CplError, match="does not fit this model"):
        other.apply(model)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(CplError, match="profiled on other weights"):
        mask.apply(model)
    mask.apply(model, allow_other_weights=True).remove()
    nothing = Mask.from_bool({name: torch.zeros(p.shape, dtype=torch.bool) for name, p in model.named_parameters()}, {})
    with pytest.raises(CplError, match="nothing to train"):
        nothing.apply(model)
    assert all(parameter.requires_grad for parameter in model.parameters())  # a refusal leaves no trace


def test_from_ref_reads_a_path_and_registry_names(model, tmp_path, monkeypatch):
    monkeypatch.setenv("CPL_MASKS_HOME", str(tmp_path / "home"))
    mask = random_mask(model)
    path = mask.save(tmp_path / "tiny.safetensors")
    assert Mask.from_ref(str(path)).id == mask.id
    name = Registry().register(path)
    assert name == "tiny/tiny@v1"
    for ref in (name, "tiny/tiny", mask.id[:10]):
        assert Mask.from_ref(ref).id == mask.id
    with pytest.raises(CplError, match="no such file, registered name or id") as refused:
        Mask.from_ref("runs/missing.safetensors")  # reads as owner/name, yet names a file
    assert "Hub" not in str(refused.value)  # a file name never goes to the Hub
    with pytest.raises(CplError, match="no such file, registered name or id"):
        Mask.from_ref("nothing-here")


def test_from_ref_pulls_a_hub_repo(model, tmp_path, monkeypatch):
    from tests.fake_hub import TOKEN, FakeHubServer, Repo

    mask = random_mask(model)
    sha = "1" * 40
    server = FakeHubServer()
    server.hub.repos["me/tiny-mask"] = Repo(
        private=False,
        branches={"main": sha},
        commits={sha: {"mask.safetensors": mask.save(tmp_path / "m.safetensors").read_bytes()}},
    )
    for key, value in {
        "HF_ENDPOINT": server.url,
        "HF_TOKEN": TOKEN,
        "HF_HUB_CACHE": str(tmp_path / "hub-cache"),
        "CPL_MASKS_HOME": str(tmp_path / "home"),
    }.items():
        monkeypatch.setenv(key, value)
    try:
        assert Mask.from_ref("me/tiny-mask").id == mask.id
        assert Mask.from_ref(f"hf://me/tiny-mask@{sha}").id == mask.id
        assert Registry().show("tiny/hub.me.tiny-mask")["repo_id"] == "me/tiny-mask"  # pulled masks are registered
        with pytest.raises(CplError, match="no such file, registered name or id.*as a Hub repo: .*not found"):
            Mask.from_ref("me/no-such-mask")
    finally:
        server.close()


def run_example(script: str, tmp_path: Path, *args: str) -> str:
    """Run an example script in a fresh interpreter with the registry in ``tmp_path``; returns its output."""
    env = {**os.environ, "CPL_MASKS_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_example_profile_and_train_runs(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    args = ["--model", str(tiny_model_dir), "--limit", "16", "--epochs", "1", "--out", str(out)]
    output = run_example("profile_and_train.py", tmp_path, *args)
    assert "mask " in output and "cpl: learned" in output and "full: learned" in output
    assert (out / "mask.safetensors").is_file() and (out / "cpl" / "run.json").is_file()


def test_example_trainer_integration_runs(tiny_model_dir, tmp_path):
    args = ["--model", str(tiny_model_dir), "--limit", "16", "--max-steps", "2", "--out", str(tmp_path / "out")]
    output = run_example("trainer_integration.py", tmp_path, *args)
    assert " and 0 frozen entries" in output

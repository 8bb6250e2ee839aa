"""The baseline methods: LoRA, replay, A-GEM and EWC, each through its hooks and through the training loop."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from cpl_masks.errors import CplError
from cpl_masks.methods import METHODS, MethodContext, epoch_order, make_method, method_options
from cpl_masks.methods.projection import total_dot
from cpl_masks.methods.replay import replay_count
from cpl_masks.models import load_model
from cpl_masks.scoring.scorers import make_scorer, pad_left
from cpl_masks.training.loop import TrainConfig, TrainingLoop
from tests.conftest import make_questions, write_rows
from tests.helpers import snapshot

INJECT = make_questions(6, seed=41, prefix="i")
MASTERED = make_questions(5, seed=42, prefix="m")
HELDOUT = make_questions(4, seed=43, prefix="h")
BASELINES = ("lora", "replay", "agem", "ewc", "random-signs")


def fresh(tiny_model_dir):
    """A private copy of the tiny model (training mutates it); one thread is fastest for a tiny model."""
    return load_model(str(tiny_model_dir), device="cpu", threads=1)


def context_for(loaded, mastered=MASTERED, *, seed: int = 0, scoring: str = "letter") -> MethodContext:
    """A method context on ``loaded`` with the letter scorer and the mastered set M."""
    return MethodContext(scorer=make_scorer(scoring, loaded.tokenizer), mastered=mastered, batch_size=4, seed=seed)


def trainer_for(loaded, name: str, options=None, **config) -> TrainingLoop:
    """A TrainingLoop running method ``name`` on ``loaded`` (batches of two, no progress bars)."""
    context = context_for(loaded)
    settings = {"lr": 0.05, "batch_size": 2, "show_progress": False, **config}
    return TrainingLoop(loaded.model, context.scorer, make_method(name, context, options), TrainConfig(**settings))


# --- LoRA -------------------------------------------------------------------------------------------


def base_weights(wrapped) -> dict[str, torch.Tensor]:
    """The base model's weights inside a peft wrapper, under the plain model's parameter names."""
    inner = wrapped.get_base_model()
    return {
        name.replace(".base_layer", ""): parameter.detach()
        for name, parameter in inner.named_parameters()
        if "lora_" not in name
    }


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_lora_changes_only_the_adapters(tiny_model_dir, optimizer):
    loaded = fresh(tiny_model_dir)
    before = snapshot(loaded.model)
    trainer = trainer_for(loaded, "lora", optimizer=optimizer, weight_decay=0.1)
    adapters = {name: parameter.detach().clone() for name, parameter in trainer.named}
    assert adapters and all("lora_" in name for name in adapters)
    for epoch in (1, 2):
        trainer.train_epoch(INJECT, epoch)  # 3 steps per epoch
    after = base_weights(trainer.model)
    assert after.keys() == before.keys()
    for name, weight in after.items():
        assert torch.equal(weight.view(torch.uint8), before[name].view(torch.uint8)), f"{name} changed"
    unchanged = [name for name, parameter in trainer.named if torch.equal(parameter.detach(), adapters[name])]
    assert not unchanged, f"adapters that never moved: {unchanged}"
    described = trainer.method.describe()
    assert described["trainable_parameters"] == sum(parameter.numel() for _, parameter in trainer.named)
    assert described["all_parameters"] == sum(before[name].numel() for name in before) + sum(
        adapter.numel() for adapter in adapters.values()
    )


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lora_adapter_loads_with_plain_peft(tiny_model_dir, tmp_path):
    from peft import PeftModel

    loaded = fresh(tiny_model_dir)
    trainer = trainer_for(
        loaded, "lora", {"lora_rank": 4, "lora_targets": "q_proj,v_proj,down_proj"}, optimizer="adamw"
    )
    trainer.train_epoch(INJECT, 1)
    trainer.method.save(trainer.model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    base = fresh(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(base.model, tmp_path / "adapter").eval()
    batch = pad_left([[5, 9, 12, 30], [7, 8]], base.tokenizer.pad_token_id, reloaded.device)
    with torch.no_grad():
        trained_logits = trainer.model(**batch, use_cache=False).logits  # (2, 4, V)
        reloaded_logits = reloaded(**batch, use_cache=False).logits
    torch.testing.assert_close(reloaded_logits, trained_logits, rtol=1e-5, atol=1e-6)
    untouched = fresh(tiny_model_dir).model
    with torch.no_grad():
        assert not torch.allclose(untouched(**batch, use_cache=False).logits, trained_logits, atol=1e-4)


@pytest.mark.parametrize("scoring", ["letter", "loglik"])
def test_scorers_work_on_the_peft_wrapper(tiny_model_dir, scoring):
    loaded = fresh(tiny_model_dir)
    plain_scorer = make_scorer(scoring, loaded.tokenizer)
    expected, _ = plain_scorer.choice_scores(loaded.model, INJECT[:3])  # (B, C) before wrapping
    wrapped = make_method("lora", context_for(loaded, scoring=scoring)).prepare(loaded.model)
    assert wrapped.device == torch.device("cpu")
    scores, losses = plain_scorer.choice_scores(wrapped, INJECT[:3])  # uses logits_to_keep and model.device
    torch.testing.assert_close(scores, expected)  # B starts at zero: the wrapper starts as the base model
    assert plain_scorer.loss(wrapped, INJECT[:3]).requires_grad and losses.shape == (3,)


def test_lora_init_is_seeded(tiny_model_dir):
    def adapters(seed: int) -> dict[str, torch.Tensor]:
        loaded = fresh(tiny_model_dir)
        wrapped = make_method("lora", context_for(loaded, seed=seed)).prepare(loaded.model)
        return {name: p.detach().clone() for name, p in wrapped.named_parameters() if "lora_A" in name}

    first, again, other = adapters(3), adapters(3), adapters(4)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


# --- replay -----------------------------------------------------------------------------------------


def replay_stream(share: float, *, epoch: int = 1, seed: int = 0, inject=INJECT) -> list:
    context = MethodContext(scorer=None, mastered=MASTERED, seed=seed)
    return make_method("replay", context, {"replay_share": share}).stream(inject, epoch, seed)


@pytest.mark.parametrize("share", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9])
def test_replay_stream_has_the_share_and_only_mastered_questions(share):
    stream = replay_stream(share, epoch=2, seed=5)
    mastered_ids, inject_ids = {q.id for q in MASTERED}, {q.id for q in INJECT}
    replayed = [q for q in stream if q.id in mastered_ids]
    assert len(replayed) == replay_count(len(INJECT), share) == round(len(INJECT) * share / (1 - share))
    assert abs(len(replayed) / len(stream) - share) <= 0.5 / len(stream)
    assert not {q.id for q in stream} & {q.id for q in HELDOUT}
    assert {q.id for q in stream} <= mastered_ids | inject_ids
    injected = [q for q in stream if q.id in inject_ids]
    assert injected == [INJECT[index] for index in epoch_order(len(INJECT), 5, 2)]  # the usual order, each once
    counts = [sum(q.id == m.id for q in replayed) for m in MASTERED]
    assert max(counts) - min(counts) <= 1  # cycles through all of M before repeating
    if replayed:  # spread evenly: no long run of injection questions
        runs = "".join("m" if q.id in mastered_ids else "i" for q in stream).split("m")
        assert max(len(run) for run in runs) <= math.ceil(len(INJECT) / len(replayed))


def test_replay_stream_is_fixed_by_seed_and_epoch():
    first = [q.id for q in replay_stream(0.5, epoch=2, seed=7)]
    assert first == [q.id for q in replay_stream(0.5, epoch=2, seed=7)]
    assert first != [q.id for q in replay_stream(0.5, epoch=3, seed=7)]
    assert first != [q.id for q in replay_stream(0.5, epoch=2, seed=8)]


# --- A-GEM ------------------------------------------------------------------------------------------


def step_gradient(model, scorer, question) -> dict[str, torch.Tensor]:
    """Leave one question's answer-loss gradient in every ``.grad``; return a copy of it."""
    model.zero_grad(set_to_none=True)
    scorer.loss(model, [question]).mean().backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def test_agem_projects_a_conflicting_gradient(tiny_model_dir):
    loaded = fresh(tiny_model_dir)
    method = make_method("agem", context_for(loaded))
    model = method.prepare(loaded.model)
    method.before_step(model, 1, 0)  # computes g_M over M
    assert total_dot([(g, g) for g in method.reference.value.values()]) > 0
    raw = step_gradient(model, method.reference.context.scorer, INJECT[0])
    generator = torch.Generator().manual_seed(0)
    method.reference.kept = {  # g_M ≈ −g: a certain conflict
        name: -grad + 0.3 * grad.abs().mean() * torch.randn(grad.shape, generator=generator)
        for name, grad in raw.items()
    }
    g_m = method.reference.value
    assert total_dot([(raw[name], g_m[name]) for name in raw]) < 0
    method.mask_gradients(model)
    projected = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    dot = total_dot([(projected[name], g_m[name]) for name in raw])
    norms = math.sqrt(total_dot([(g, g) for g in projected.values()]) * total_dot([(g, g) for g in g_m.values()]))
    assert dot >= -1e-6 * norms
    assert method.describe() == {"projected_steps": 1, "steps": 1}
    coefficient = total_dot([(raw[n], g_m[n]) for n in raw]) / total_dot([(g_m[n], g_m[n]) for n in raw])
    for name in raw:
        torch.testing.assert_close(projected[name], raw[name] - coefficient * g_m[name], rtol=1e-5, atol=1e-7)


def test_agem_leaves_an_agreeing_gradient_alone(tiny_model_dir):
    loaded = fresh(tiny_model_dir)
    method = make_method("agem", context_for(loaded))
    model = method.prepare(loaded.model)
    raw = step_gradient(model, method.reference.context.scorer, INJECT[0])
    method.reference.kept = {name: grad.clone() for name, grad in raw.items()}  # g·g_M > 0
    method.mask_gradients(model)
    method.reference.kept = {name: torch.zeros_like(grad) for name, grad in raw.items()}  # g_M = 0: skipped
    method.mask_gradients(model)
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter.grad, raw[name]), name
    assert method.describe() == {"projected_steps": 0, "steps": 2}


# --- EWC --------------------------------------------------------------------------------------------

PINNED = "model.layers.1.mlp.down_proj.weight"


def prepared_ewc(tiny_model_dir, strength: float = 1e4):
    loaded = fresh(tiny_model_dir)
    method = make_method("ewc", context_for(loaded), {"ewc_lambda": strength})
    return method, method.prepare(loaded.model)


def test_ewc_fisher_is_the_mean_squared_per_question_gradient(tiny_model_dir):
    method, model = prepared_ewc(tiny_model_dir)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    reference = fresh(tiny_model_dir)
    scorer = make_scorer("letter", reference.tokenizer)
    names = [PINNED, "model.layers.0.self_attn.k_proj.weight"]
    parameters = [dict(reference.model.named_parameters())[name] for name in names]
    expected = [torch.zeros(p.shape, dtype=torch.float64) for p in parameters]
    for question in MASTERED:
        grads = torch.autograd.grad(scorer.loss(reference.model, [question]).sum(), parameters)
        for total, grad in zip(expected, grads, strict=True):
            total += grad.double().square() / len(MASTERED)
    for name, values in zip(names, expected, strict=True):
        assert values.abs().max() > 0, name
        torch.testing.assert_close(method.fisher[name].double(), values, rtol=1e-4, atol=1e-12)


def test_ewc_penalty_is_zero_at_the_start_and_differentiates_right(tiny_model_dir):
    strength = 1e4
    method, model = prepared_ewc(tiny_model_dir, strength)
    assert method.penalty(model).item() == 0.0
    parameter = dict(model.named_parameters())[PINNED]
    fisher = method.fisher[PINNED]
    moved = int(fisher.argmax())  # the most pinned entry
    still = int(fisher.argmin())
    with torch.no_grad():
        parameter.view(-1)[moved] += 0.01
    gradient = torch.autograd.grad(method.penalty(model), parameter)[0].view(-1)
    expected = 2 * strength * fisher.view(-1)[moved] * 0.01
    for index, analytic in ((moved, expected), (still, 0.0)):
        step = 0.004
        with torch.no_grad():
            parameter.view(-1)[index] += step
            upper = method.penalty(model).item()
            parameter.view(-1)[index] -= 2 * step
            lower = method.penalty(model).item()
            parameter.view(-1)[index] += step
        central = (upper - lower) / (2 * step)
        assert gradient[index].item() == pytest.approx(central, rel=1e-3, abs=1e-6)
        assert gradient[index].item() == pytest.approx(float(analytic), rel=1e-4, abs=1e-9)
    assert gradient.count_nonzero() == 1


# --- random signs ------------------------------------------------------------------------------------


def test_random_signs_steer_each_step_by_signs_drawn_from_seed_epoch_and_step(tiny_model_dir):
    loaded = fresh(tiny_model_dir)
    model, scorer = loaded.model, make_scorer("letter", loaded.tokenizer)
    method = make_method("random-signs", context_for(loaded, seed=3), {"refresh_every": 2})
    again = make_method("random-signs", context_for(loaded, seed=3))
    method.before_step(model, 1, 0)
    again.before_step(model, 1, 0)
    drawn = method.signs
    assert all(torch.equal(drawn.positive[name], again.signs.positive[name]) for name in drawn.positive)
    method.before_step(model, 1, 1)
    assert method.signs is drawn  # not due: every 2 steps
    method.before_step(model, 1, 2)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(method.signs.sign(name), drawn.sign(name))  # drawn afresh
    signs = method.signs.sign(name)
    assert signs.ne(0).all() and abs(signs.eq(1).float().mean().item() - 0.5) < 0.01  # even odds, none zero

    scorer.loss(model, INJECT[:2]).sum().backward()
    before = {key: parameter.grad.clone() for key, parameter in model.named_parameters()}
    method.mask_gradients(model)
    for key, parameter in model.named_parameters():
        kept = before[key] * method.signs.sign(key) >= 0
        assert torch.equal(parameter.grad, torch.where(kept, before[key], torch.zeros_like(before[key]))), key
    share = before[name].ne(0) & model.get_parameter(name).grad.eq(0)
    assert 0.4 < share.float().mean().item() < 0.6  # about half of each step's entries dropped


def test_random_signs_that_never_refresh_keep_the_first_draw_resumed_or_not(tiny_model_dir):
    loaded = fresh(tiny_model_dir)
    model = loaded.model
    method = make_method("random-signs", context_for(loaded, seed=3), {"refresh_every": 0})
    method.before_step(model, 1, 0)
    first = method.signs
    method.before_step(model, 2, 0)
    assert method.signs is first  # an epoch's start redraws nothing
    resumed = make_method("random-signs", context_for(loaded, seed=3), {"refresh_every": 0})
    resumed.before_step(model, 3, 0)  # a run resumed at epoch 3 draws its first signs again
    assert all(torch.equal(resumed.signs.positive[name], first.positive[name]) for name in first.positive)
    assert all(torch.equal(resumed.signs.negative[name], first.negative[name]) for name in first.negative)


# --- all baselines -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BASELINES)
def test_each_baseline_trains_an_epoch(tiny_model_dir, name):
    loaded = fresh(tiny_model_dir)
    trainer = trainer_for(loaded, name, optimizer="adamw", lr=1e-3)
    before = {name: parameter.detach().clone() for name, parameter in trainer.named}
    loss = trainer.train_epoch(INJECT, 1)
    assert math.isfinite(loss)
    assert any(not torch.equal(parameter.detach(), before[name]) for name, parameter in trainer.named)
    assert isinstance(trainer.method.describe(), dict) and name in METHODS


@pytest.mark.parametrize("name", ["replay", "agem", "ewc", "dynamic"])
def test_methods_that_need_mastered_questions_refuse_none(tiny_model_dir, name):
    context = MethodContext(scorer=None, mastered=[])
    with pytest.raises(CplError, match=rf"^--method {name} needs a non-empty mastered set \(--mastered\)$"):
        make_method(name, context)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("replay", {"lora_rank": 4}, "--lora-rank does not apply to --method replay"),
        ("lora", {"refresh_every": 2}, "--refresh-every does not apply to --method lora"),
        ("ewc", {"replay_share": 0.5}, "--replay-share does not apply to --method ewc"),
        ("agem", {"ewc_lambda": 1.0}, "--ewc-lambda does not apply to --method agem"),
        ("lora", {"lora_rank": 0}, "--lora-rank 0: must be at least 1"),
        ("lora", {"lora_alpha": 0}, "--lora-alpha 0: must be positive"),
        ("lora", {"lora_dropout": 1.0}, r"--lora-dropout 1.0: must be in \[0, 1\)"),
        ("lora", {"lora_targets": " , "}, "--lora-targets ' , ': give all-linear or comma-separated module names"),
        ("replay", {"replay_share": 1.0}, r"--replay-share 1.0: must be in \[0, 1\)"),
        ("replay", {"replay_share": -0.1}, r"--replay-share -0.1: must be in \[0, 1\)"),
        ("ewc", {"ewc_lambda": 0.0}, "--ewc-lambda 0.0: must be a positive number"),
        ("ewc", {"ewc_lambda": math.inf}, "--ewc-lambda inf: must be a positive number"),
        ("replay", {"replay_share": math.nan}, r"--replay-share nan: must be in \[0, 1\)"),
        ("agem", {"refresh_every": -1}, r"--refresh-every -1: must be at least 1 \(or 0: never\)"),
        ("dynamic", {"uncertain": "freeze"}, r"--uncertain freeze needs --confidence \(without it every sign counts\)"),
        ("dynamic", {"confidence": -1.0}, "--confidence -1.0: must be a finite number >= 0"),
        ("dynamic", {"confidence": 2.0, "uncertain": "drop"}, "--uncertain drop: choose one of pass, freeze"),
    ],
)
def test_bad_options_are_refused_in_one_line(name, options, message):
    with pytest.raises(CplError, match=rf"^{message}$"):
        method_options(name, options)


def test_options_default_and_none_means_default():
    assert method_options("lora", {"lora_rank": None}) == method_options("lora")
    lora = method_options("lora", {"lora_targets": "q_proj, v_proj"})
    assert (lora.lora_rank, lora.lora_alpha, lora.lora_dropout) == (8, 16, 0.0)
    assert lora.target_modules() == ["q_proj", "v_proj"]
    assert method_options("lora").target_modules() == "all-linear"
    assert method_options("replay").replay_share == 0.5
    assert method_options("ewc").ewc_lambda == 1e4
    assert method_options("agem").refresh_every is None


def test_lora_targets_missing_from_the_model_are_refused(tiny_model_dir):
    loaded = fresh(tiny_model_dir)
    method = make_method("lora", context_for(loaded), {"lora_targets": "no_such_proj"})
    with pytest.raises(CplError, match="^--lora-targets no_such_proj: "):
        method.prepare(loaded.model)


def test_cli_refuses_an_option_of_another_method(tmp_path, monkeypatch):
    from cpl_masks.cli.app import app

    monkeypatch.setenv("CPL_MASKS_HOME", str(tmp_path / "home"))
    data = write_rows(tmp_path / "inject.jsonl", [q.to_record() for q in INJECT])
    mastered = write_rows(tmp_path / "mastered.jsonl", [q.to_record() for q in MASTERED])
    args = ["train", "--inject", str(data), "--mastered", str(mastered), "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, [*args, "--method", "replay", "--lora-rank", "4"])
    assert result.exit_code == 2
    assert "--lora-rank does not apply to --method replay" in result.output
    assert not (tmp_path / "run").exists()

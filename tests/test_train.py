"""The training loop: static masks freeze exactly, dynamic mode is the paper's rule, runs resume exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from cpl_masks.data.questions import load_questions
from cpl_masks.data.split import resolve_scoring
from cpl_masks.errors import CplError
from cpl_masks.masks.format import Mask
from cpl_masks.methods import MethodContext, epoch_order, make_method
from cpl_masks.methods.masking import DynamicCPL, FullFineTuning, StaticMask
from cpl_masks.models import load_model, model_fingerprint
from cpl_masks.profiling.freeze_mask import profile
from cpl_masks.registry import Registry
from cpl_masks.scoring.scorers import LetterScorer, make_scorer
from cpl_masks.training.frozen import pack_frozen
from cpl_masks.training.loop import MaskedAdamW, TrainConfig, TrainingDiverged, TrainingLoop, optimizer_state_bytes
from cpl_masks.training.record import RunRecord
from cpl_masks.training.request import RunRequest
from cpl_masks.training.run import resume_run, start_run
from tests.conftest import make_questions, write_rows
from tests.helpers import assert_frozen_unchanged, snapshot

INJECT = make_questions(6, seed=21, prefix="i")
MASTERED = make_questions(5, seed=22, prefix="m")
FULLY_FROZEN, FULLY_TRAINED = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"


def fresh(tiny_model_dir):
    """A private copy of the tiny model (training mutates it); one thread is fastest for a tiny model."""
    return load_model(str(tiny_model_dir), device="cpu", threads=1)


def random_mask(model, seed: int = 0, scoring: str = "letter") -> Mask:
    """About half the entries collaborative; one tensor wholly frozen and one wholly trainable."""
    generator = torch.Generator().manual_seed(seed)
    bits = {
        name: torch.rand(parameter.shape, generator=generator) < 0.5 for name, parameter in model.named_parameters()
    }
    bits[FULLY_FROZEN].fill_(False)
    bits[FULLY_TRAINED].fill_(True)
    metadata = {"model": {"ref": "tiny", "fingerprint": model_fingerprint(model)}, "scoring": scoring}
    return Mask.from_bool(bits, metadata)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adamw"])
def test_static_mask_changes_only_collaborative_entries(tiny_model_dir, optimizer):
    loaded = fresh(tiny_model_dir)
    mask = random_mask(loaded.model)
    before = snapshot(loaded.model)
    config = TrainConfig(lr=0.05, optimizer=optimizer, batch_size=2, weight_decay=0.1, show_progress=False)
    scorer = make_scorer("letter", loaded.tokenizer)
    trainer = TrainingLoop(loaded.model, scorer, StaticMask(MethodContext(scorer, [], mask)), config)
    for epoch in (1, 2):
        trainer.train_epoch(INJECT, epoch)  # 3 steps per epoch
    assert_frozen_unchanged(before, loaded.model, mask)
    parameters = dict(loaded.model.named_parameters())
    assert not parameters[FULLY_FROZEN].requires_grad
    for name in (FULLY_TRAINED, "model.layers.1.mlp.down_proj.weight"):
        collaborative = mask.collaborative(name)
        moved = (parameters[name].detach() != before[name])[collaborative].float().mean()
        assert moved > 0.5, f"{name}: only {moved:.0%} of collaborative entries changed"


def test_masked_adamw_keeps_state_only_for_collaborative_entries(tiny_model_dir):
    loaded = fresh(tiny_model_dir)
    mask = random_mask(loaded.model)
    config = TrainConfig(lr=1e-3, optimizer="adamw", show_progress=False)
    scorer = make_scorer("letter", loaded.tokenizer)
    trainer = TrainingLoop(loaded.model, scorer, StaticMask(MethodContext(scorer, [], mask)), config)
    trainer.train_epoch(INJECT[:2], 1)
    assert isinstance(trainer.optimizer, MaskedAdamW)
    states = {name: trainer.optimizer.state[parameter] for name, parameter in trainer.named}
    assert FULLY_FROZEN not in states
    for name, state in states.items():
        assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == mask.collaborative_count(name)
    assert optimizer_state_bytes(trainer.optimizer) == 2 * 4 * mask.collaborative_count()
    assert trainer.trainable_entries == mask.collaborative_count()


@pytest.fixture(params=[None, 7, 1], ids=["whole", "chunks-of-7", "row-by-row"])
def chunk_entries(request, monkeypatch):
    """The step's chunk size: as shipped, or small enough that a tensor takes several chunks."""
    if request.param is not None:
        monkeypatch.setattr("cpl_masks.masks.bits.CHUNK_ENTRIES", request.param)
    return request.param


def test_masked_adamw_without_mask_is_adamw(chunk_entries):
    torch.manual_seed(0)
    ours, reference = torch.nn.Parameter(torch.randn(5, 4)), None
    reference = torch.nn.Parameter(ours.detach().clone())
    masked = MaskedAdamW([ours], [None], lr=0.01, weight_decay=0.1)
    plain = torch.optim.AdamW([reference], lr=0.01, weight_decay=0.1)
    for _ in range(4):
        grad = torch.randn(5, 4)
        ours.grad, reference.grad = grad.clone(), grad.clone()
        masked.step()
        plain.step()
    torch.testing.assert_close(ours.detach(), reference.detach(), rtol=1e-6, atol=1e-7)


def test_masked_adamw_matches_adamw_on_the_collaborative_entries(chunk_entries):
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(6, 5))
    frozen = torch.rand(6, 5) < 0.4  # bool, True = frozen entry
    before = ours.detach().clone()
    reference = torch.nn.Parameter(before[~frozen].clone())  # (n_collaborative,) trained by plain AdamW
    settings = {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}
    masked = MaskedAdamW([ours], [pack_frozen(frozen)], **settings)
    plain = torch.optim.AdamW([reference], **settings)
    for _ in range(5):
        grad = torch.randn(6, 5)
        ours.grad, reference.grad = grad.clone(), grad[~frozen].clone()
        masked.step()
        plain.step()
    torch.testing.assert_close(ours.detach()[~frozen], reference.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(ours.detach()[frozen], before[frozen])  # not even weight decay
    assert not torch.equal(ours.detach()[~frozen], before[~frozen])


def reference_dynamic(model, scorer: LetterScorer, inject, mastered, *, lr: float, epochs: int, seed: int):
    """θ ← θ − η·1[g_i ⊙ g_M ≥ 0] ⊙ g_i in float64, one example at a time, g_M per epoch; returns weights."""
    model = model.double()
    names, parameters = zip(*model.named_parameters(), strict=True)

    def grads(question) -> tuple[torch.Tensor, ...]:
        ids = scorer.tokenizer(scorer.prompt_text(question), add_special_tokens=False)["input_ids"]
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]  # (V,) float64
        target = torch.tensor(scorer.letter_ids[question.answer])
        return torch.autograd.grad(F.cross_entropy(logits, target), parameters)

    masked_entries = 0
    for epoch in range(1, epochs + 1):
        per_question = [grads(question) for question in mastered]
        g_mastered = [sum(column) / len(mastered) for column in zip(*per_question, strict=True)]
        for index in epoch_order(len(inject), seed, epoch):
            step_grads = grads(inject[index])
            with torch.no_grad():
                for parameter, g, g_m in zip(parameters, step_grads, g_mastered, strict=True):
                    keep = (g * g_m) >= 0
                    masked_entries += int((~keep).sum())
                    parameter -= lr * keep * g
    assert masked_entries > 0
    return {name: parameter.detach() for name, parameter in zip(names, parameters, strict=True)}


def test_dynamic_mode_is_the_papers_rule(tiny_model_dir):
    loaded = fresh(tiny_model_dir)
    reference_model = fresh(tiny_model_dir).model
    scorer = make_scorer("letter", loaded.tokenizer)
    before = snapshot(loaded.model)
    config = TrainConfig(lr=0.02, epochs=2, seed=3, show_progress=False)
    trainer = TrainingLoop(loaded.model, scorer, DynamicCPL(MethodContext(scorer, MASTERED, batch_size=4)), config)
    for epoch in (1, 2):
        trainer.train_epoch(INJECT, epoch)
    expected = reference_dynamic(reference_model, scorer.choices, INJECT, MASTERED, lr=0.02, epochs=2, seed=3)
    moved = max(float((p.detach() - before[n]).abs().max()) for n, p in loaded.model.named_parameters())
    assert moved > 1e-3
    for name, parameter in loaded.model.named_parameters():
        torch.testing.assert_close(parameter.detach().double(), expected[name], rtol=0, atol=2e-6)


def test_refresh_every_recomputes_g_m_every_k_steps(tiny_model_dir, monkeypatch):
    import cpl_masks.profiling.retain as reference  # where the rule's signs are measured

    refreshes = []
    original = reference.mean_gradients

    def counted(*args, **kwargs):
        refreshes.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(reference, "mean_gradients", counted)
    weights = {}
    for refresh_every, expected in ((None, 2), (2, 6)):  # 6 steps per epoch: steps 0 (, 2 and 4) refresh
        refreshes.clear()
        loaded = fresh(tiny_model_dir)
        scorer = make_scorer("letter", loaded.tokenizer)
        method = make_method("dynamic", MethodContext(scorer, MASTERED, batch_size=4), {"refresh_every": refresh_every})
        trainer = TrainingLoop(loaded.model, scorer, method, TrainConfig(lr=0.05, show_progress=False))
        for epoch in (1, 2):
            trainer.train_epoch(INJECT, epoch)
        assert len(refreshes) == expected, refresh_every
        weights[refresh_every] = snapshot(loaded.model)
    assert any(not torch.equal(weights[None][name], weights[2][name]) for name in weights[None])


def test_refresh_sample_draws_n_questions_of_m_per_refresh_the_same_after_a_resume(tiny_model_dir, monkeypatch):
    import cpl_masks.profiling.retain as reference  # where the rule's signs are measured

    seen: list[list[str]] = []
    original = reference.mean_gradients

    def recorded(model, scorer, questions, **kwargs):
        seen.append([question.id for question in questions])
        return original(model, scorer, questions, **kwargs)

    monkeypatch.setattr(reference, "mean_gradients", recorded)
    options = {"refresh_every": 3, "refresh_sample": 4}

    def run(epochs: tuple[int, ...]) -> list[list[str]]:
        seen.clear()
        loaded = fresh(tiny_model_dir)
        scorer = make_scorer("letter", loaded.tokenizer)
        method = make_method("dynamic", MethodContext(scorer, MASTERED, batch_size=4, seed=5), options)
        trainer = TrainingLoop(loaded.model, scorer, method, TrainConfig(lr=0.05, show_progress=False))
        for epoch in epochs:
            trainer.train_epoch(INJECT, epoch)
        return list(seen)

    both = run((1, 2))  # 6 steps per epoch: refreshes at steps 0 and 3 of each
    assert len(both) == 4 and all(len(ids) == 4 for ids in both)
    mastered_ids = {question.id for question in MASTERED}
    assert all(set(ids) <= mastered_ids for ids in both) and len({tuple(ids) for ids in both}) > 1
    assert run((2,)) == both[2:]  # a run resumed at epoch 2 draws what the uninterrupted one drew


def test_nan_loss_stops_training(tiny_model_dir):
    loaded = fresh(tiny_model_dir)
    config = TrainConfig(lr=1e12, show_progress=False)
    trainer = TrainingLoop(loaded.model, make_scorer("letter", loaded.tokenizer), FullFineTuning(), config)
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step \d+: the loss is (nan|inf)"):
        trainer.train_epoch(INJECT, 1)


def test_epoch_order_is_a_seeded_permutation():
    assert sorted(epoch_order(10, 0, 1)) == list(range(10))
    assert epoch_order(10, 0, 1) == epoch_order(10, 0, 1)
    assert epoch_order(10, 0, 1) != epoch_order(10, 0, 2)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"optimizer": "adam"}, "--optimizer adam: choose one of sgd, momentum, adamw"),
        ({"lr": 0}, "--lr 0: must be a positive number"),
        ({"lr": math.inf}, "--lr inf: must be a positive number"),
        ({"epochs": 0}, "--epochs 0: must be at least 1"),
        ({"batch_size": 0}, "--batch-size 0: must be at least 1"),
        ({"eval_batch_size": 0}, "--eval-batch-size 0: must be at least 1"),
        ({"momentum": -5}, r"--momentum -5: must be in \[0, 1\)"),
        ({"momentum": 1.0}, r"--momentum 1.0: must be in \[0, 1\)"),
        ({"weight_decay": -0.1}, "--weight-decay -0.1: must be a number of at least 0"),
        ({"weight_decay": math.nan}, "--weight-decay nan: must be a number of at least 0"),
    ],
)
def test_bad_config_is_refused_in_one_line(values, message):
    with pytest.raises(CplError, match=rf"^{message}$"):
        TrainConfig(**values).check()


def test_scoring_follows_the_mask_and_refuses_a_mismatch(tiny_model_dir, tmp_path):
    scoring = random_mask(fresh(tiny_model_dir).model, scoring="loglik").metadata["scoring"]
    inject = str(tmp_path / "inject.jsonl")
    assert resolve_scoring(None, mask_scoring=scoring, data_path=inject) == "loglik"
    assert resolve_scoring(None, data_path=inject) == "letter"
    (tmp_path / "split.json").write_text(json.dumps({"scoring": "loglik-norm"}))
    assert resolve_scoring(None, data_path=inject) == "loglik-norm"
    with pytest.raises(CplError, match="profiled with loglik"):
        resolve_scoring("letter", mask_scoring=scoring, data_path=inject)
    assert resolve_scoring("letter", mask_scoring=scoring, data_path=inject, force=True) == "letter"


@pytest.fixture
def run_files(tmp_path):
    inject = write_rows(tmp_path / "inject.jsonl", [q.to_record() for q in INJECT[:4]])
    mastered = write_rows(tmp_path / "mastered.jsonl", [q.to_record() for q in MASTERED[:3]])
    heldout = write_rows(tmp_path / "heldout.jsonl", [q.to_record() for q in make_questions(3, 23, "h")])
    return inject, mastered, heldout


def make_request(tiny_model_dir, run_files, out, *, optimizer: str = "momentum", **options) -> RunRequest:
    inject, mastered, heldout = run_files
    config = TrainConfig(epochs=2, lr=0.05, optimizer=optimizer, show_progress=False)
    values = {"mode": "full", **options}
    return RunRequest(
        inject=str(inject),
        mastered=str(mastered),
        heldout=str(heldout),
        out=str(out),
        model=str(tiny_model_dir),
        device="cpu",
        threads=1,
        config=config,
        **values,
    )


def saved_weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model" / "model.safetensors")


@pytest.mark.parametrize(
    ("mode", "optimizer"), [("full", "momentum"), ("mask", "adamw"), ("dynamic", "sgd"), ("reprofiled mask", "sgd")]
)
def test_resume_ends_with_the_same_weights(tiny_model_dir, run_files, tmp_path, monkeypatch, mode, optimizer):
    monkeypatch.setenv("CPL_MASKS_HOME", str(tmp_path / "home"))
    options = {"optimizer": optimizer, "mode": mode}
    if mode == "mask":
        mask = random_mask(fresh(tiny_model_dir).model).save(tmp_path / "mask.safetensors")
        options = {"optimizer": optimizer, "mode": None, "mask": str(mask)}
    if mode == "reprofiled mask":  # profiled again every step: the resumed run must make the same masks
        inject, mastered = (load_questions(path) for path in run_files[:2])
        mask = profile(fresh(tiny_model_dir), mastered, inject, show_progress=False).save(tmp_path / "mask.safetensors")
        options = {"optimizer": optimizer, "mode": None, "mask": str(mask), "method_options": {"reprofile_every": 1}}
    whole = start_run(make_request(tiny_model_dir, run_files, tmp_path / "whole", **options))

    def stop_after_epoch_one(rows):
        if rows[-1]["epoch"] == 1:
            raise KeyboardInterrupt

    broken = make_request(tiny_model_dir, run_files, tmp_path / "broken", **options)
    with pytest.raises(KeyboardInterrupt):
        start_run(broken, on_epoch=stop_after_epoch_one)
    assert not (tmp_path / "broken" / "run.json").exists()
    resumed = resume_run(tmp_path / "broken", show_progress=False)
    assert resumed.resumed and resumed.metrics == whole.metrics
    made = [(row["epoch"], row["step"], row["mask_id"]) for row in whole.made_masks]
    assert made == [(row["epoch"], row["step"], row["mask_id"]) for row in resumed.made_masks]
    assert len(made) == (7 if mode == "reprofiled mask" else 0)  # 4 steps an epoch: (1, 1..3), (2, 0..3)
    if mode == "reprofiled mask":  # registered as children of the run's mask, under <task>.reprofiled
        lineage = Registry().lineage(str(mask))
        assert {child["id"] for child in lineage["children"]} == {mask_id for _, _, mask_id in made}
        assert all(child["ref"].split("@")[0].endswith(".reprofiled") for child in lineage["children"])
    expected, actual = saved_weights(tmp_path / "whole"), saved_weights(tmp_path / "broken")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    with pytest.raises(CplError, match="already finished"):
        resume_run(tmp_path / "broken")


def test_run_writes_artifacts_and_a_loadable_model(tiny_model_dir, run_files, tmp_path, monkeypatch):
    monkeypatch.setenv("CPL_MASKS_HOME", str(tmp_path / "home"))
    loaded = fresh(tiny_model_dir)
    mask_path = random_mask(loaded.model).save(tmp_path / "mask.safetensors")
    out = tmp_path / "run"
    seen = []
    run = start_run(
        make_request(tiny_model_dir, run_files, out, mode=None, mask=str(mask_path)),
        on_epoch=lambda rows: seen.append(rows[-1]["epoch"]),
    )
    assert seen == [0, 1, 2]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in metrics] == [0, 1, 2]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    on_disk = json.loads((out / "run.json").read_text())
    assert on_disk["mask_id"] == Mask.load(mask_path).id and on_disk["mode"] == "mask"
    assert on_disk["task"] == tmp_path.name and on_disk["data"]["heldout"]["rows"] == 3  # inject.jsonl's folder
    assert run.final["learned"] == metrics[-1]["learned"] and RunRecord.read(out) == run
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert_frozen_unchanged(snapshot(loaded.model), reloaded, Mask.load(mask_path))
    with pytest.raises(CplError, match="not empty"):
        start_run(make_request(tiny_model_dir, run_files, out))


def test_diverged_run_keeps_the_last_good_checkpoint(tiny_model_dir, run_files, tmp_path, monkeypatch):
    monkeypatch.setenv("CPL_MASKS_HOME", str(tmp_path / "home"))
    calls = {"count": 0}
    original = LetterScorer.loss

    def loss_that_explodes_in_epoch_two(self, model, questions):
        calls["count"] += 1
        loss = original(self, model, questions)
        return loss * float("nan") if calls["count"] > 4 else loss  # 4 steps per epoch

    monkeypatch.setattr(LetterScorer, "loss", loss_that_explodes_in_epoch_two)
    out = tmp_path / "run"
    kept = rf"the last good checkpoint \(epoch 1\) is in {out}/checkpoint"
    advice = rf"try a smaller --lr: cpl-masks train --resume {out} --lr SMALLER"
    with pytest.raises(TrainingDiverged, match=rf"^epoch 2, step 1: the loss is nan .*; stopped, {kept}; {advice}$"):
        start_run(make_request(tiny_model_dir, run_files, out))
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1 and not (out / "run.json").exists()


def test_mask_for_other_weights_is_refused(tiny_model_dir, tiny_base_model_dir, run_files, tmp_path, monkeypatch):
    monkeypatch.setenv("CPL_MASKS_HOME", str(tmp_path / "home"))
    mask_path = random_mask(fresh(tiny_model_dir).model).save(tmp_path / "mask.safetensors")
    other = make_request(tiny_base_model_dir, run_files, tmp_path / "run", mode=None, mask=str(mask_path))
    with pytest.raises(CplError, match="profiled on other weights"):
        start_run(other)


def test_a_reprofiled_mask_is_the_profile_at_the_weights_it_was_made_at(tiny_model_dir):
    loaded = fresh(tiny_model_dir)
    scorer = make_scorer("letter", loaded.tokenizer)
    first = profile(loaded, MASTERED, INJECT, batch_size=4, show_progress=False)
    context = MethodContext(scorer, MASTERED, first, inject=INJECT, batch_size=4)
    method = make_method("mask", context, {"reprofile_every": 4})
    trainer = TrainingLoop(loaded.model, scorer, method, TrainConfig(lr=0.5, show_progress=False))
    trainer.train_epoch(INJECT, 1)  # 6 steps: profiled again at step 4
    after_one = snapshot(loaded.model)
    trainer.train_epoch(INJECT, 2)  # and at the start of epoch 2, at the weights after epoch 1
    assert [mask.metadata["reprofiled_at"] for mask in method.made_masks()] == [
        {"epoch": 1, "step": 4},
        {"epoch": 2, "step": 0},
        {"epoch": 2, "step": 4},
    ]
    at_epoch_two = method.made_masks()[1]
    again = fresh(tiny_model_dir)
    again.model.load_state_dict(after_one)
    expected = profile(again, MASTERED, INJECT, batch_size=4, show_progress=False)
    assert at_epoch_two.metadata["parents"] == [first.id] and at_epoch_two.id != first.id
    assert all(torch.equal(at_epoch_two.collaborative(n), expected.collaborative(n)) for n in expected.names)
    latest = method.made_masks()[-1]
    assert all(torch.equal(method.frozen[n], pack_frozen(~latest.collaborative(n))) for n in latest.names)


def test_reprofiling_is_refused_for_a_control_mask_and_with_adamw(tiny_model_dir, run_files, tmp_path):
    loaded = fresh(tiny_model_dir)
    scorer = make_scorer("letter", loaded.tokenizer)
    control = random_mask(loaded.model)  # no sign rule to apply again
    with pytest.raises(CplError, match="not a sign rule"):
        make_method("mask", MethodContext(scorer, MASTERED, control, inject=INJECT), {"reprofile_every": 2})
    path = control.save(tmp_path / "mask.safetensors")
    options = {"mode": None, "mask": str(path), "method_options": {"reprofile_every": 2}}
    request = make_request(tiny_model_dir, run_files, tmp_path / "run", optimizer="adamw", **options)
    with pytest.raises(CplError, match="--reprofile-every runs with --optimizer sgd"):
        request.check()

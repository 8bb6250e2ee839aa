"""Profiling: batched float32 gradients and masks against a one-question-at-a-time float64 reference."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from cpl_masks.data.split import resolve_scoring
from cpl_masks.errors import CplError
from cpl_masks.masks.algebra import recut
from cpl_masks.models import load_model, model_fingerprint
from cpl_masks.profiling.freeze_mask import profile, sign_agreement
from cpl_masks.profiling.gradients import gradient_sums, mean_gradients
from cpl_masks.profiling.selection import Cut, bf16_keys
from cpl_masks.scoring.scorers import make_scorer
from tests.conftest import make_questions

MASTERED = make_questions(9, seed=11, prefix="m")
INJECT = make_questions(7, seed=12, prefix="i")


def reference_gradients(model, scorer, questions) -> dict[str, torch.Tensor]:
    """Mean gradient in float64, one question and one backward at a time (the paper's loop)."""
    model64 = copy.deepcopy(model).double()
    names, parameters = zip(*model64.named_parameters(), strict=True)
    total = [torch.zeros_like(parameter) for parameter in parameters]
    for question in questions:
        loss = scorer.loss(model64, [question]).double().sum()
        for buffer, grad in zip(total, torch.autograd.grad(loss, parameters), strict=True):
            buffer += grad
    return {name: buffer / len(questions) for name, buffer in zip(names, total, strict=True)}


@pytest.fixture(scope="module")
def reference(tiny):
    scorer = make_scorer("letter", tiny.tokenizer)
    return {key: reference_gradients(tiny.model, scorer, rows) for key, rows in (("M", MASTERED), ("I", INJECT))}


@pytest.fixture(scope="module")
def profiled(tiny):
    return profile(tiny, MASTERED, INJECT, batch_size=4, save_scores=True, show_progress=False)


def assert_relative_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, value in actual.items():
        assert value.dtype == torch.float32
        scale = expected[name].abs().max().item()
        error = (value.double() - expected[name]).abs().max().item()
        assert error <= 1e-5 * scale, f"{name}: max error {error:.3g} vs scale {scale:.3g}"


def test_batched_gradients_match_float64_loop(tiny, reference):
    scorer = make_scorer("letter", tiny.tokenizer)
    assert_relative_close(mean_gradients(tiny.model, scorer, MASTERED, batch_size=4), reference["M"])
    assert_relative_close(mean_gradients(tiny.model, scorer, INJECT, batch_size=3), reference["I"])


def test_mask_matches_float64_mask_except_at_tiny_scores(profiled, reference):
    for name in profiled.names:
        scores = reference["M"][name] * reference["I"][name]  # float64 s
        decided = scores.abs() >= 1e-12
        assert torch.equal(profiled.collaborative(name)[decided], (scores >= 0)[decided]), name


def test_touched_counts_and_dot_products_match_reference(profiled, reference):
    for name, stats in profiled.metadata["tensors"].items():
        touched = reference["I"][name] != 0
        scores = reference["M"][name] * reference["I"][name]
        assert stats["touched"] == int(touched.sum())
        assert stats["touched_collaborative"] == int((profiled.collaborative(name) & touched).sum())
        assert stats["dot_positive"] == pytest.approx(float(scores.clamp(min=0).sum()), rel=1e-4, abs=1e-12)
        assert stats["dot_negative"] == pytest.approx(float(scores.clamp(max=0).sum()), rel=1e-4, abs=1e-12)
    counts = profiled.metadata["counts"]
    assert counts["touched"] == sum(stats["touched"] for stats in profiled.metadata["tensors"].values())
    assert counts["collaborative"] == profiled.collaborative_count()


def test_provenance_and_run_report(tiny, profiled):
    meta = profiled.metadata
    assert meta["model"] == {
        "ref": tiny.ref,
        "fingerprint": model_fingerprint(tiny.model),
        "fingerprint_bf16": model_fingerprint(tiny.model, rounded_to=torch.bfloat16),
        "dtype": "float32",
    }
    assert meta["data"]["mastered"]["rows"] == len(MASTERED) and meta["data"]["inject"]["rows"] == len(INJECT)
    assert meta["rule"] == {
        "threshold": 0.0,
        "keep_fraction": None,
        "freeze_pattern": None,
        "train_pattern": None,
        "statistic": "product",
    }
    assert meta["profile"]["peak_memory_kind"] == "rss" and meta["profile"]["peak_memory_bytes"] > 0
    assert profiled.names == [name for name, _ in tiny.model.named_parameters()]


def test_profiling_leaves_the_model_as_it_was(tiny):
    before = model_fingerprint(tiny.model)
    tiny.model.model.norm.weight.requires_grad_(False)
    try:
        profile(tiny, MASTERED[:2], INJECT[:2], batch_size=2, show_progress=False)
        assert not tiny.model.model.norm.weight.requires_grad
    finally:
        tiny.model.model.norm.weight.requires_grad_(True)
    assert all(parameter.grad is None for parameter in tiny.model.parameters())
    assert model_fingerprint(tiny.model) == before


def keep(fraction: float, **patterns) -> Cut:
    return Cut(threshold=None, keep_fraction=fraction, **patterns)


def flat(mask, values) -> torch.Tensor:
    """One tensor's values after another, in the mask's (model) order, flattened."""
    return torch.cat([values(name).reshape(-1) for name in mask.names])


@pytest.mark.parametrize("fraction", [0.3, 0.75, 0.8])  # 0.75 and 0.8 cut into the entries scoring exactly 0
def test_keep_fraction_keeps_exactly_the_share_and_equals_a_recut(tiny, profiled, reference, fraction):
    cut = profile(tiny, MASTERED, INJECT, cut=keep(fraction), batch_size=4, show_progress=False)
    assert cut.collaborative_count() == math.ceil(fraction * cut.entries)
    keys = flat(cut, lambda name: bf16_keys(profiled.scores[name]))
    kept = flat(cut, cut.collaborative)
    assert keys[kept].min() >= keys[~kept].max()
    at_cut = (keys == keys[kept].min()).nonzero().reshape(-1)  # ties at the cut: the earliest positions win
    assert kept[at_cut].tolist() == sorted(kept[at_cut].tolist(), reverse=True)
    recut_mask = recut(profiled, keep_fraction=fraction)
    assert recut_mask.id == cut.id
    assert recut_mask.metadata["tensors"] == cut.metadata["tensors"]
    for name, stats in cut.metadata["tensors"].items():
        touched = reference["I"][name] != 0
        assert stats["touched_collaborative"] == int((cut.collaborative(name) & touched).sum()), name


def test_recut_at_zero_reproduces_the_threshold_mask(profiled):
    again = recut(profiled, threshold=0.0)
    assert again.id == profiled.id
    assert again.metadata["tensors"] == profiled.metadata["tensors"]
    higher = recut(profiled, threshold=1e-9)
    assert higher.collaborative_count() < profiled.collaborative_count()


def test_patterns_force_whole_tensors(tiny):
    rule = keep(0.5, freeze_pattern="embed", train_pattern="norm")
    mask = profile(tiny, MASTERED, INJECT, cut=rule, save_scores=True, show_progress=False)
    eligible = sum(mask.entries_of(name) for name in mask.names if rule.forced(name) is None)
    forced_on = sum(mask.entries_of(name) for name in mask.names if rule.forced(name))
    assert mask.collaborative_count() == math.ceil(0.5 * eligible) + forced_on
    assert not mask.collaborative("model.embed_tokens.weight").any()
    assert mask.collaborative("model.norm.weight").all()
    stats = mask.metadata["tensors"]
    assert stats["model.embed_tokens.weight"]["touched_collaborative"] == 0
    assert stats["model.norm.weight"]["touched_collaborative"] == stats["model.norm.weight"]["touched"]


def test_a_recut_keeps_the_patterns_and_says_it_is_a_recut(tiny):
    rule = Cut(threshold=0.0, freeze_pattern="embed", train_pattern="norm")
    mask = profile(tiny, MASTERED, INJECT, cut=rule, save_scores=True, show_progress=False)
    cut = recut(mask, keep_fraction=0.2)
    assert cut.metadata["rule"] == {
        "threshold": None,
        "keep_fraction": 0.2,
        "freeze_pattern": "embed",
        "train_pattern": "norm",
        "statistic": "product",
    }
    assert cut.metadata["recut_of"] == mask.id and cut.metadata["parents"] == [mask.id]
    assert not cut.collaborative("model.embed_tokens.weight").any()
    assert cut.collaborative("model.norm.weight").all()


def test_bfloat16_model_accumulates_in_float32(tiny_model_dir, reference):
    loaded = load_model(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    gradients = mean_gradients(loaded.model, make_scorer("letter", loaded.tokenizer), INJECT, batch_size=3)
    for name, gradient in gradients.items():
        assert gradient.dtype == torch.float32
        cosine = torch.nn.functional.cosine_similarity(
            gradient.double().reshape(-1), reference["I"][name].reshape(-1), 0
        )
        assert cosine > 0.95, name


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scoring": "nope"}, "--scoring nope: choose one of letter, loglik, loglik-norm"),
        ({"batch_size": 0}, "--batch-size"),
    ],
)
def test_bad_options_are_one_line_errors(tiny, options, message):
    with pytest.raises(CplError, match=message):
        profile(tiny, MASTERED[:2], INJECT[:2], show_progress=False, **options)


def test_profile_takes_the_scoring_split_json_records(tiny, tmp_path):
    mastered = tmp_path / "mastered.jsonl"
    (tmp_path / "split.json").write_text(json.dumps({"scoring": "loglik"}))
    mask = profile(tiny, MASTERED[:2], INJECT[:2], data_paths={"mastered": str(mastered)}, show_progress=False)
    assert mask.metadata["scoring"] == "loglik"
    assert profile(tiny, MASTERED[:2], INJECT[:2], show_progress=False).metadata["scoring"] == "letter"


def test_scoring_is_resolved_in_one_order(tmp_path):
    data = tmp_path / "inject.jsonl"
    assert resolve_scoring(None, data_path=data) == "letter"
    (tmp_path / "split.json").write_text(json.dumps({"scoring": "loglik-norm"}))
    assert resolve_scoring(None, data_path=data) == "loglik-norm"
    assert resolve_scoring(None, mask_scoring="loglik", data_path=data) == "loglik"
    assert resolve_scoring("loglik", mask_scoring="loglik", data_path=data) == "loglik"
    assert resolve_scoring("letter", data_path=data) == "letter"
    assert resolve_scoring("letter", mask_scoring="loglik", force=True) == "letter"


@pytest.mark.parametrize(
    ("requested", "options", "message"),
    [
        ("foo", {"mask_scoring": "loglik"}, "--scoring foo: choose one of letter, loglik, loglik-norm"),
        (
            "letter",
            {"mask_scoring": "loglik"},
            "--scoring letter: the mask was profiled with loglik scoring; pass --force to use it anyway",
        ),
        (
            "letter",
            {"mask_scoring": "loglik", "force": None},
            "--scoring letter: the mask was profiled with loglik scoring",
        ),
    ],
)
def test_scoring_refusals_name_the_problem(requested, options, message):
    with pytest.raises(CplError) as error:
        resolve_scoring(requested, **options)
    assert str(error.value) == message


def test_sign_agreement_is_complete_at_the_profiled_weights_and_drops_after_a_step(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), device="cpu", threads=1)
    mask = profile(loaded, MASTERED, INJECT, batch_size=4, show_progress=False)
    scorer = make_scorer("letter", loaded.tokenizer)
    untouched = sign_agreement(loaded.model, scorer, mask, MASTERED, INJECT, batch_size=3)
    assert untouched["all"] > 0.9999 and untouched["touched"] > 0.9999  # only |s| ~ 0 entries may flip
    step = mean_gradients(loaded.model, scorer, INJECT)
    with torch.no_grad():  # a large step along -g_I moves the weights: the rule changes with them
        for name, grad in step.items():
            loaded.model.get_parameter(name).sub_(5.0 * grad)
    moved = sign_agreement(loaded.model, scorer, mask, MASTERED, INJECT)
    assert moved["touched"] < untouched["touched"]


def per_question_gradients(model, scorer, questions) -> list[dict[str, torch.Tensor]]:
    """Each question's gradient in float64, one backward at a time."""
    model64 = copy.deepcopy(model).double()
    names, parameters = zip(*model64.named_parameters(), strict=True)
    rows = []
    for question in questions:
        loss = scorer.loss(model64, [question]).double().sum()
        rows.append(dict(zip(names, torch.autograd.grad(loss, parameters), strict=True)))
    return rows


def test_gradient_sums_give_moments_that_match_the_per_question_mean_and_standard_error(tiny):
    scorer = make_scorer("letter", tiny.tokenizer)
    rows = per_question_gradients(tiny.model, scorer, MASTERED)
    stacked = {name: torch.stack([row[name] for row in rows]) for name in rows[0]}  # (n, param shape) float64
    moments = gradient_sums(tiny.model, scorer, MASTERED).moments()
    count = len(MASTERED)
    assert_relative_close(moments.mean, {name: values.mean(0) for name, values in stacked.items()})
    expected = {name: values.std(0, correction=1) / count**0.5 for name, values in stacked.items()}
    assert_relative_close(moments.standard_error, expected)


def test_moments_tensor_by_tensor_equal_the_whole_and_keep_the_sums(tiny):
    scorer = make_scorer("letter", tiny.tokenizer)
    sums = gradient_sums(tiny.model, scorer, MASTERED)
    whole = sums.moments()
    # copies: a result may share storage with the sums, and a later look must not change what was seen
    expected = {name: (whole.mean[name].clone(), whole.standard_error[name].clone()) for name in whole.mean}
    for _ in range(2):  # the sums are kept: a second look gives the same
        by_tensor = list(sums.moments_by_tensor())
        assert [name for name, _, _ in by_tensor] == list(expected)
        for name, mean, error in by_tensor:
            assert torch.equal(mean, expected[name][0]) and torch.equal(error, expected[name][1])


def test_the_confidence_rule_freezes_only_entries_whose_t_statistic_is_below_minus_k(tiny):
    scorer = make_scorer("letter", tiny.tokenizer)
    stats = {}
    for key, rows in (("M", MASTERED), ("I", INJECT)):
        gradients = per_question_gradients(tiny.model, scorer, rows)
        stacked = {name: torch.stack([row[name] for row in gradients]) for name in gradients[0]}
        stats[key] = {n: (v.mean(0), v.std(0, correction=1) / len(rows) ** 0.5) for n, v in stacked.items()}
    frozen_shares = []
    for k in (0.0, 1.0, 2.0):
        mask = profile(tiny, MASTERED, INJECT, cut=Cut.from_options(None, None, k), show_progress=False)
        assert mask.metadata["rule"]["statistic"] == "t" and mask.metadata["rule"]["threshold"] == -k
        frozen_shares.append(1 - mask.collaborative_share())
        for name in mask.names:
            (g_m, se_m), (g_i, se_i) = stats["M"][name], stats["I"][name]
            error = (g_i.square() * se_m.square() + g_m.square() * se_i.square()).sqrt()
            t = torch.where(error > 0, g_m * g_i / error, torch.zeros_like(error))
            decided = (t + k).abs() > 1e-3  # away from the cut, where float32 and float64 agree
            frozen = ~mask.collaborative(name)
            assert torch.equal(frozen[decided], (t < -k)[decided]), f"k={k} {name}"
    assert frozen_shares[0] > frozen_shares[1] > frozen_shares[2] > 0


def test_confidence_and_threshold_are_refused_together_and_a_keep_fraction_ranks_by_t():
    with pytest.raises(CplError, match="--confidence or --threshold"):
        Cut.from_options(0.1, None, 2.0)
    with pytest.raises(CplError, match="--confidence -1"):
        Cut.from_options(None, None, -1.0)
    assert Cut.from_options(None, 0.3, 2.0) == Cut(None, 0.3, statistic="t")

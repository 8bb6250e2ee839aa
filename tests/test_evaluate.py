"""Learned/forgotten counting against the epoch-0 baseline, tables and plots."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cpl_masks.evaluation.outcomes import (
    comparison_rows,
    count_transitions,
    draw_comparison,
    draw_curves,
    epoch_metrics,
    evaluate_sets,
    metrics_table_rows,
    text_loss,
)
from cpl_masks.scoring.scorers import Scores, make_scorer, score_questions
from tests.conftest import make_questions
from tests.test_run_record import a_record


def scored(correct: list[bool], logprobs: list[float]) -> Scores:
    """Scores with the given correctness and correct-choice scores (margins: logprob + 1)."""
    return Scores(
        predictions=[0] * len(correct),
        correct=correct,
        losses=[-value for value in logprobs],
        logprobs=logprobs,
        margins=[value + 1 for value in logprobs],
    )


BASELINE = {
    "inject": scored([False, False, True, False], [-3.0, -3.0, -1.0, -2.0]),  # one already right at epoch 0
    "mastered": scored([True, True, True, False], [-1.0, -1.0, -1.0, -2.0]),  # one already wrong at epoch 0
    "heldout": scored([True, False], [-1.0, -2.0]),
}
AFTER = {
    "inject": scored([True, False, False, True], [-1.0, -2.0, -2.0, -1.0]),  # 2 learned; a lost right one not
    "mastered": scored([False, True, True, True], [-3.0, -1.0, -1.5, -0.5]),  # 1 forgotten; a fixed wrong one not
    "heldout": scored([False, True], [-2.0, -1.0]),
}


def test_count_transitions():
    assert count_transitions([False, True, True, False], [True, False, True, False]) == (1, 1)
    with pytest.raises(ValueError):
        count_transitions([True], [True, False])


def test_epoch_metrics_count_against_the_baseline():
    row = epoch_metrics(2, BASELINE, AFTER, train_loss=0.5)
    assert (row["learned"], row["forgotten"], row["heldout_forgotten"]) == (2, 1, 1)
    assert row["totals"] == {"inject_wrong": 3, "mastered_right": 3, "heldout_right": 1}
    assert row["accuracy"]["inject"] == 0.5
    assert metrics_table_rows([row])[0][:5] == (2, 0.5, "2/3", "1/3", "1/1")
    assert row["delta_logprob"] == {"inject": 0.75, "mastered": -0.25, "heldout": 0.0}
    assert row["delta_margin"] == row["delta_logprob"]
    assert row["retain_loss"] is None and row["retain_loss_delta"] is None
    with_text = epoch_metrics(1, BASELINE, AFTER, retain_loss=(2.0, 2.5))
    assert (with_text["retain_loss"], with_text["retain_loss_delta"]) == (2.5, 0.5)


def test_without_heldout_the_heldout_count_is_absent():
    sets = {key: BASELINE[key] for key in ("inject", "mastered")}
    row = epoch_metrics(0, sets, sets)
    assert row["heldout_forgotten"] is None and row["learned"] == row["forgotten"] == 0
    assert metrics_table_rows([row])[0][4] == "-"


def test_evaluate_sets_matches_scoring(tiny):
    scorer = make_scorer("letter", tiny.tokenizer)
    sets = {"inject": make_questions(5, seed=1), "mastered": make_questions(4, seed=2), "heldout": []}
    scores = evaluate_sets(tiny.model, scorer, sets, batch_size=3, show_progress=False)
    assert set(scores) == {"inject", "mastered"}
    alone = score_questions(tiny.model, scorer, sets["inject"], show_progress=False)
    assert scores["inject"].correct == alone.correct
    assert scores["inject"].logprobs == pytest.approx(alone.logprobs, abs=1e-5)


def test_text_loss_is_the_mean_next_token_cross_entropy(tiny):
    import torch
    import torch.nn.functional as F

    text = "The capital of France is Paris. Water boils at one hundred degrees. " * 3
    ids = [tiny.tokenizer.bos_token_id, *tiny.tokenizer(text, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        logits = tiny.model(torch.tensor([ids])).logits[0, :-1]  # (T-1, V)
    expected = float(F.cross_entropy(logits, torch.tensor(ids[1:])))
    assert text_loss(tiny.model, tiny.tokenizer, text) == pytest.approx(expected, rel=1e-5)
    # windows padded into one batch give the same per-token mean as reading each window alone
    windowed = text_loss(tiny.model, tiny.tokenizer, text, window=7, batch_size=4)
    alone = text_loss(tiny.model, tiny.tokenizer, text, window=7, batch_size=1)
    assert windowed == pytest.approx(alone, rel=1e-5)


def test_plots_are_png(tmp_path):
    rows = [epoch_metrics(0, BASELINE, BASELINE), epoch_metrics(1, BASELINE, AFTER, train_loss=1.0)]
    draw_curves(rows, tmp_path / "curves.png")
    run = a_record(mode="mask", mask_id="ab" * 32, final=rows[-1], time_s=3.0, peak_memory_bytes=2**21)
    draw_comparison({"a": run, "b": replace(run, mode="full")}, tmp_path / "compare.png")
    for name in ("curves.png", "compare.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert comparison_rows({"a": run})[0] == ("a", "mask", "abababab", "2/3", "1/3", "1/1", "+0.000", 3.0, 2)
    assert metrics_table_rows(rows)[1][5:] == ("-0.250", "+0.000", "-")

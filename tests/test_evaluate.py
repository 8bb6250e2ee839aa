"""Learned/forgotten counting against the epoch-0 baseline, tables and plots."""

from __future__ import annotations

import pytest

from cpl_masks.evaluate import (
    comparison_rows,
    count_transitions,
    draw_comparison,
    draw_curves,
    epoch_metrics,
    evaluate_sets,
    metrics_table_rows,
)
from cpl_masks.scoring import make_scorer, score_questions
from tests.conftest import make_questions

BASELINE = {
    "inject": [False, False, True, False],  # one injection question already right at epoch 0
    "mastered": [True, True, True, False],  # one mastered question already wrong at epoch 0
    "heldout": [True, False],
}
AFTER = {
    "inject": [True, False, False, True],  # 2 learned; the already-right one lost does not count
    "mastered": [False, True, True, True],  # 1 forgotten; the already-wrong one fixed does not count
    "heldout": [False, True],
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


def test_without_heldout_the_heldout_count_is_absent():
    sets = {key: BASELINE[key] for key in ("inject", "mastered")}
    row = epoch_metrics(0, sets, sets)
    assert row["heldout_forgotten"] is None and row["learned"] == row["forgotten"] == 0
    assert metrics_table_rows([row])[0][4] == "-"


def test_evaluate_sets_matches_scoring(tiny):
    scorer = make_scorer("letter", tiny.tokenizer)
    sets = {"inject": make_questions(5, seed=1), "mastered": make_questions(4, seed=2), "heldout": []}
    correct = evaluate_sets(tiny.model, scorer, sets, batch_size=3, show_progress=False)
    assert set(correct) == {"inject", "mastered"}
    assert correct["inject"] == score_questions(tiny.model, scorer, sets["inject"], show_progress=False).correct


def test_plots_are_png(tmp_path):
    rows = [epoch_metrics(0, BASELINE, BASELINE), epoch_metrics(1, BASELINE, AFTER, train_loss=1.0)]
    draw_curves(rows, tmp_path / "curves.png")
    run = {"mode": "mask", "mask_id": "ab" * 32, "final": rows[-1], "time_s": 3.0, "peak_memory_bytes": 2**21}
    draw_comparison({"a": run, "b": {**run, "mode": "full"}}, tmp_path / "compare.png")
    for name in ("curves.png", "compare.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert comparison_rows({"a": run})[0] == ("a", "mask", "abababab", "2/3", "1/3", "1/1", 3.0, 2)

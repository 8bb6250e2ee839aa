"""Evidence that can decide: per-question records, a forgetting pool, every epoch a point, paired statistics."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cpl_masks.cli.app import app
from cpl_masks.data.questions import load_questions
from cpl_masks.data.split import POOL_PREFIX, split_questions, write_split
from cpl_masks.errors import CplError
from cpl_masks.evaluation.outcomes import (
    compare_outcomes,
    outcome_differences,
    question_outcomes,
    read_question_records,
)
from cpl_masks.scoring.scorers import make_scorer, score_questions
from cpl_masks.sweep.config import SweepConfig
from cpl_masks.sweep.report import aggregate, best_per_method, final_points, learned_forgotten_auc
from cpl_masks.sweep.run import run_sweep
from cpl_masks.training.run import resume_run, start_run
from tests.conftest import make_questions, write_rows
from tests.test_resume import interrupted
from tests.test_train import make_request


@pytest.fixture
def run_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    inject = write_rows(data / "inject.jsonl", [q.to_record() for q in make_questions(6, 61, "i")])
    mastered = write_rows(data / "mastered.jsonl", [q.to_record() for q in make_questions(5, 62, "m")])
    heldout = write_rows(data / "heldout.jsonl", [q.to_record() for q in make_questions(7, 63, "h")])
    return inject, mastered, heldout


def counts_from_records(records: list[dict], epoch: int) -> dict[str, int]:
    return {name: sum(flags.values()) for name, flags in question_outcomes(records, epoch).items()}


def test_every_evaluated_epoch_keeps_each_questions_result(tiny_model_dir, run_files, tmp_path):
    request = make_request(tiny_model_dir, run_files, tmp_path / "run", eval_every=2)
    request.config.epochs = 3
    run = start_run(request)
    assert [row["epoch"] for row in run.metrics] == [0, 2, 3]  # every 2nd epoch and the last
    records = read_question_records(tmp_path / "run")
    assert sorted({(r["epoch"], r["set"]) for r in records}) == [
        (epoch, name) for epoch in (0, 2, 3) for name in ("heldout", "inject", "mastered")
    ]
    inject_ids = [q.id for q in load_questions(run_files[0])]
    assert all(r["id"] == inject_ids for r in records if r["set"] == "inject")
    for row in run.metrics:  # the records say which questions; the metrics say how many
        found = counts_from_records(records, row["epoch"])
        assert found == {key: row[key] for key in ("learned", "forgotten", "heldout_forgotten")}
        accuracy = {r["set"]: sum(r["correct"]) / len(r["correct"]) for r in records if r["epoch"] == row["epoch"]}
        assert accuracy == pytest.approx(row["accuracy"])


def test_records_survive_a_resume_exactly(tiny_model_dir, run_files, tmp_path):
    whole = make_request(tiny_model_dir, run_files, tmp_path / "whole")
    whole.config.epochs = 3
    start_run(whole)
    broken = make_request(tiny_model_dir, run_files, tmp_path / "broken")
    broken.config.epochs = 3
    interrupted(broken, epoch=2)
    resume_run(tmp_path / "broken", show_progress=False)
    assert read_question_records(tmp_path / "broken") == read_question_records(tmp_path / "whole")


def test_a_bad_eval_every_is_refused_before_any_work(tiny_model_dir, run_files, tmp_path):
    with pytest.raises(CplError, match="^--eval-every 0: "):
        start_run(make_request(tiny_model_dir, run_files, tmp_path / "run", eval_every=0))
    assert not (tmp_path / "run").exists()


def test_the_forgetting_pool_never_overlaps_the_split_and_is_scored_once(tiny, tmp_path):
    questions = make_questions(16, seed=71)
    candidates = questions[:5] + make_questions(30, seed=72, prefix="p")  # five of them are the split's own
    split = split_questions(tiny, questions, scoring="loglik", pool=candidates, pool_limit=6, show_progress=False)
    pool = [q for q in split.heldout if q.id.startswith(POOL_PREFIX)]
    assert split.summary["counts"]["pool"] == len(pool) <= 6
    own = {(q.question, q.choices) for q in questions}
    assert pool and not any((q.question, q.choices) in own for q in pool)
    scores = score_questions(tiny.model, make_scorer("loglik", tiny.tokenizer), pool, show_progress=False)
    assert all(scores.correct)  # only questions the untouched model answers right
    assert [split.scores[q.id]["margins"] for q in pool] == pytest.approx(scores.margins, abs=1e-5)
    folder = write_split(split, tmp_path / "split")
    assert {row["id"] for row in map(json.loads, (folder / "scores.jsonl").read_text().splitlines())} >= {
        q.id for q in pool
    }  # recorded with the split, so runs take epoch 0 from it


def test_a_pool_margin_keeps_out_lucky_guesses(tiny):
    questions = make_questions(10, seed=73)
    candidates = make_questions(30, seed=74, prefix="p")
    loose = split_questions(tiny, questions, scoring="loglik", pool=candidates, show_progress=False)
    strict = split_questions(tiny, questions, scoring="loglik", pool=candidates, min_margin=0.5, show_progress=False)
    assert all(strict.scores[q.id]["margins"] >= 0.5 for q in strict.heldout if q.id.startswith(POOL_PREFIX))
    assert strict.summary["counts"]["pool"] < loose.summary["counts"]["pool"]


def epoch_run(method: str, epochs: list[tuple[float, float]], seed: int = 0) -> dict:
    """A run summary whose evaluated epochs 1, 2, ... learned and forgot these shares."""
    figures = [
        {"epoch": index, "learned_share": learned, "heldout_forgotten_share": forgotten, "forgotten_share": forgotten,
         "delta_margin": {"heldout": -forgotten}, "delta_logprob": {"heldout": 0.0}}
        for index, (learned, forgotten) in enumerate(epochs, start=1)
    ]  # fmt: skip
    return {"method": method, "lr": 1e-3, "seed": seed, **figures[-1], "epochs": figures, "time_s": 1.0}


def test_the_budget_ranges_over_epochs_not_only_the_last():
    runs = [epoch_run("full", [(0.2, 0.0), (0.5, 0.01), (0.9, 0.3)]), epoch_run("mask", [(0.1, 0.0), (0.3, 0.0)])]
    points = aggregate(runs)
    assert sorted((p["method"], p["epoch"]) for p in points) == [("full", 1), ("full", 2), ("full", 3), ("mask", 1),
                                                                   ("mask", 2)]  # fmt: skip
    best = best_per_method(points, budget=0.02)
    assert (best["full"]["epoch"], best["full"]["learned_share"]) == (2, 0.5)  # epoch 3 forgets past the budget
    assert best["mask"]["epoch"] == 2


def test_the_area_under_the_curve_is_the_mean_learned_over_budgets():
    runs = [epoch_run("full", [(0.2, 0.0), (0.6, 0.5), (0.8, 1.0)]), epoch_run("mask", [(0.4, 0.0)])]
    auc = learned_forgotten_auc(aggregate(runs), up_to=1.0)
    assert auc["full"] == pytest.approx(0.2 * 0.5 + 0.6 * 0.5)  # 0.2 until 50 % forgotten, then 0.6
    assert auc["mask"] == pytest.approx(0.4)  # never forgets: its best holds over every budget
    assert learned_forgotten_auc(aggregate(runs), up_to=0.0) == {"full": 0.2, "mask": 0.4}


def outcomes(learned: list[int], forgotten: list[int]) -> dict[str, dict[str, bool]]:
    return {
        "learned": {f"i{k}": bool(v) for k, v in enumerate(learned)},
        "forgotten": {f"m{k}": bool(v) for k, v in enumerate(forgotten)},
    }


def test_runs_are_compared_question_by_question():
    reference, other = outcomes([1, 0, 0, 1], [0, 1, 0]), outcomes([1, 1, 1, 1], [0, 0, 0])
    found = compare_outcomes([(reference, other)])
    assert found["learned"]["difference"] == 2 and found["learned"]["b01"] == 2 and found["learned"]["b10"] == 0
    assert found["forgotten"]["difference"] == -1 and found["forgotten"]["contains_zero"]
    assert outcome_differences(reference, other) == [
        ("learned", "i1", False, True),
        ("learned", "i2", False, True),
        ("forgotten", "m1", True, False),
    ]
    with pytest.raises(CplError, match="did not evaluate the same inject questions"):
        compare_outcomes([(reference, outcomes([1, 1], [0, 0, 0]))])


def test_outcomes_a_caller_derived_are_compared_over_seeds_and_checked_for_one_split():
    def subset(values: list[int]) -> dict[str, dict[str, bool]]:
        return {"reach": {f"r{k}": bool(v) for k, v in enumerate(values)}}

    seeds = [(subset([1, 1, 0]), subset([0, 1, 0])), (subset([1, 0, 0]), subset([0, 0, 0]))]
    found = compare_outcomes(seeds, {"reach": "pool"})
    assert set(found) == {"reach"} and found["reach"]["difference"] == -2 and found["reach"]["seeds"] == 2
    with pytest.raises(CplError, match="did not evaluate the same pool questions"):
        compare_outcomes([*seeds, (subset([1, 0]), subset([0, 0]))], {"reach": "pool"})


@pytest.fixture
def sweep_files(tmp_path):
    data = write_rows(tmp_path / "quiz.jsonl", [q.to_record() for q in make_questions(40, seed=5)])
    pool = write_rows(tmp_path / "pool.jsonl", [q.to_record() for q in make_questions(60, seed=81, prefix="x")])
    return data, pool


def test_a_multi_epoch_sweep_with_a_pool_reports_curves_and_paired_statistics(tiny_model_dir, sweep_files, tmp_path):
    data, pool = sweep_files
    out = tmp_path / "sweep"
    args = ["sweep", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--methods",
            "full,mask,random", "--lr-grid", "0.05", "--epochs", "3", "--eval-every", "2", "--seeds", "0,1",
            "--threads", "1", "--holdout-fraction", "0.3", "--heldout-data", str(pool), "--heldout-limit", "20",
            "--forgetting-budget", "1.0", "--no-track-drift"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "sweep.json").read_text())
    counts = payload["split"]["counts"]
    assert 0 < counts["pool"] <= 20 and payload["heldout_questions"] == counts["heldout"] + counts["pool"]
    assert f"held out: {payload['heldout_questions']} mastered questions" in result.output
    assert sorted({p["epoch"] for p in payload["points"]}) == [2, 3]  # every evaluated epoch is a point
    assert all(not run["run_dir"].startswith("/") for run in payload["runs"])  # relative to the sweep folder
    assert payload["masks"]["mask"]["path"] == "masks/cpl.safetensors"
    assert set(payload["paired"]) == {"mask vs full", "random vs full", "mask vs random"}
    heldout = payload["paired"]["mask vs full"]["heldout_forgotten"]
    assert heldout["n"] == 2 * payload["heldout_questions"] and heldout["seeds"] == 2  # pooled over both seeds
    assert "paired differences, at the end of training" in result.output and "mask vs random" in result.output
    assert set(payload["paired_final"]) == set(payload["paired"])  # the same pairs, at the end of training
    for run in payload["runs"]:
        saved = json.loads((out / run["run_dir"] / "run.json").read_text())
        assert saved["baseline_source"] == "split"  # the pool was scored once, with the split
        assert saved["final"]["totals"]["heldout_right"] == payload["heldout_questions"]


def test_compare_lists_the_questions_two_runs_disagree_on(tiny_model_dir, run_files, tmp_path):
    start_run(make_request(tiny_model_dir, run_files, tmp_path / "slow"))
    fast = make_request(tiny_model_dir, run_files, tmp_path / "fast")
    fast.config.lr = 0.5
    start_run(fast)
    a, b = (question_outcomes(read_question_records(tmp_path / name)) for name in ("slow", "fast"))
    differences = outcome_differences(a, b)
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "slow"), str(tmp_path / "fast"), "--questions"])
    assert result.exit_code == 0, result.output
    assert f"questions the runs disagree on ({len(differences)})" in result.output
    assert "paired by question against slow" in result.output
    for _, key, _, _ in differences:
        assert key in result.output
    three = CliRunner().invoke(app, ["compare", *(str(tmp_path / n) for n in ("slow", "fast", "slow")), "--questions"])
    assert three.exit_code == 2 and "--questions compares two runs; 3 were given" in three.output


def test_a_multi_epoch_sweep_killed_mid_run_resumes_to_the_same_points(
    tiny_model_dir, sweep_files, tmp_path, monkeypatch
):
    from cpl_masks.training.loop import TrainingLoop

    data, pool = sweep_files

    def config(out: str) -> SweepConfig:
        return SweepConfig(model=str(tiny_model_dir), data=str(data), out=out, methods=["full", "mask"],
                           lr_grid=[0.05], epochs=3, eval_every=2, threads=1, holdout_fraction=0.3,
                           heldout_data=str(pool), heldout_limit=10, track_drift=False)  # fmt: skip

    whole = run_sweep(config(str(tmp_path / "whole")), show_progress=False, report=lambda _: None)
    original, calls = TrainingLoop.train_epoch, []

    def dies_in_the_second_run(self, questions, epoch):
        calls.append(epoch)
        if len(calls) == 5:  # run 1 trains epochs 1-3; run 2 dies in its epoch 2, after epoch 1's checkpoint
            raise KeyboardInterrupt
        return original(self, questions, epoch)

    monkeypatch.setattr(TrainingLoop, "train_epoch", dies_in_the_second_run)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config(str(tmp_path / "broken")), show_progress=False, report=lambda _: None)
    monkeypatch.setattr(TrainingLoop, "train_epoch", original)
    resumed = run_sweep(config(str(tmp_path / "broken")), show_progress=False, report=lambda _: None)

    def figures(payload: dict) -> list:
        return [{k: v for k, v in point.items() if not k.startswith("time_s")} for point in payload["points"]]

    assert figures(resumed) == figures(whole) and resumed["paired"] == whole["paired"]
    runs = tmp_path / "broken" / "runs"
    assert json.loads((runs / "mask-lr0.05-s0" / "run.json").read_text())["resumed"] is True


def test_split_takes_a_pool_from_the_command_line(tiny_model_dir, sweep_files, tmp_path):
    data, pool = sweep_files
    args = ["split", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "split"),
            "--scoring", "loglik", "--heldout-data", str(pool), "--heldout-limit", "5", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "split" / "split.json").read_text())
    heldout = load_questions(tmp_path / "split" / "mastered_heldout.jsonl")
    assert summary["counts"]["pool"] == len(heldout) == 5 and all(q.id.startswith(POOL_PREFIX) for q in heldout)
    assert "forgetting pool" in result.output
    refused = CliRunner().invoke(app, [*args[:-6], "--heldout-limit", "0", "--overwrite"])
    assert refused.exit_code == 2 and "--heldout-limit 0: must be at least 1" in refused.output


def test_the_end_of_training_is_the_last_epoch_at_the_best_or_smallest_rate():
    runs = [epoch_run("full", [(0.2, 0.1), (0.5, 0.3)]), {**epoch_run("full", [(0.4, 0.0), (0.6, 0.0)]), "lr": 1e-2}]
    points = aggregate(runs)
    best = best_per_method(points, budget=0.02)
    assert final_points(points, best)["full"]["lr"] == 1e-2 and final_points(points, best)["full"]["epoch"] == 2
    nothing = best_per_method(points, budget=-1.0)  # no point within the budget: the smallest rate's end
    assert (final_points(points, nothing)["full"]["lr"], final_points(points, nothing)["full"]["epoch"]) == (1e-3, 2)

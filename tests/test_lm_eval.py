"""Forgetting on lm-evaluation-harness tasks: samples to records, a run scored on a local task, compare, errors."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from cpl_masks.errors import CplError
from cpl_masks.evaluation.harness import check_options, parse_tasks, task_metrics, task_records, task_scores
from cpl_masks.evaluation.outcomes import compare_outcomes, question_outcomes, read_question_records
from tests.conftest import make_questions, write_rows
from tests.test_train_cli import files, invoke, train_args  # noqa: F401  (files is a fixture)

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")

TASK = "cpl_tiny_mc"
DOCS = 8
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: "{{{{['A', 'B', 'C', 'D', 'E'].index(answer)}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture
def task_dir(tmp_path):
    """A local lm-eval task over a small JSONL in the shared data's shape (``answer`` a letter)."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    rows = [
        {"id": q.id, "question": q.question, "choices": list(q.choices), "answer": "ABCDE"[q.answer]}
        for q in make_questions(DOCS, 7, "d")
    ]
    data = write_rows(folder / "docs.jsonl", rows)
    text = TASK_YAML.format(task=TASK, data=json.dumps(str(data)), cache=json.dumps(str(tmp_path / "hf-cache")))
    (folder / f"{TASK}.yaml").write_text(text)
    return folder


def sample(doc_id, lls, target, acc, filter_="none"):
    return {
        "doc_id": doc_id,
        "target": target,
        "filtered_resps": [(ll, False) for ll in lls],
        "acc": acc,
        "filter": filter_,
    }


def test_samples_become_items_with_gold_loglik_and_margin():
    samples = [
        sample(1, [-3.0, -1.0, -2.0], 1, 1.0),
        sample(0, [-1.0, -4.0], 1, 0.0),
        sample(0, [-9.0, -9.0], 1, 1.0, filter_="other"),  # another filter's sample of doc 0 is not used
        sample(2, [-2.0, -1.5, -1.0], [0, 2], 1.0),  # several golds: the best one counts
    ]
    scores = task_scores("t", samples)
    assert scores.ids == ["t:0", "t:1", "t:2"] and scores.correct == [False, True, True]
    assert scores.logprobs == [-4.0, -1.0, -1.0] and scores.margins == [-3.0, 1.0, 0.5]
    single = task_scores("t", [{"doc_id": 0, "target": " x", "filtered_resps": [(-2.5, True)], "acc": 1}])
    assert single.logprobs == [-2.5] and single.margins is None  # a loglikelihood task: no other choice
    generated = task_scores("t", [{"doc_id": 0, "target": "4", "filtered_resps": ["4"], "acc": 1}])
    assert generated.correct == [True] and generated.logprobs is None and generated.margins is None
    with pytest.raises(CplError, match="no acc metric"):
        task_scores("t", [{"doc_id": 0, "target": "4", "filtered_resps": ["4"], "exact_match": 1.0}])
    records = task_records(3, {"t": scores})
    assert records == [
        {
            "epoch": 3,
            "set": "lm-eval:t",
            "id": ["t:0", "t:1", "t:2"],
            "correct": [0, 1, 1],
            "logprob": [-4.0, -1.0, -1.0],
            "margin": [-3.0, 1.0, 0.5],
        }
    ]
    later = task_scores("t", [sample(0, [-1.0, -4.0], 1, 0.0), sample(1, [-1.0, -3.0], 1, 0.0), samples[3]])
    figures = task_metrics({"t": scores}, {"t": later})["t"]
    assert (figures["forgotten"], figures["right_before"], figures["learned"], figures["wrong_before"]) == (1, 2, 0, 1)
    assert figures["delta_margin"] == pytest.approx((0.0 - 3.0 + 0.0) / 3)


def test_option_checks():
    assert parse_tasks(" a, b ,a,") == ["a", "b"] and parse_tasks(None) is None
    with pytest.raises(CplError, match="names no task"):
        parse_tasks(" , ")
    with pytest.raises(CplError, match="--lm-eval-limit needs --lm-eval-tasks"):
        check_options(None, None, 5)
    with pytest.raises(CplError, match="--lm-eval-limit 0"):
        check_options(["a"], None, 0)


def lm_eval_args(task_dir, *extra: str) -> list[str]:
    return ["--lm-eval-tasks", TASK, "--lm-eval-include", str(task_dir), *extra]


@needs_lm_eval
def test_a_run_scores_a_local_task_before_and_after_and_compare_pairs_it(tiny_model_dir, files, task_dir, tmp_path):  # noqa: F811
    runs = {}
    for name, lr, extra in (("slow", "0.01", lm_eval_args(task_dir)), ("fast", "0.5", lm_eval_args(task_dir))):
        args = [*train_args(tiny_model_dir, files, tmp_path / name, "--method", "full", "--epochs", "2"), *extra]
        args[args.index("--lr") + 1] = lr
        result = invoke(args)
        assert result.exit_code == 0, result.output
        assert "lm-eval tasks at epoch 2" in result.output and TASK in result.output
        runs[name] = tmp_path / name
    records = read_question_records(runs["fast"])
    harness = [record for record in records if record["set"] == f"lm-eval:{TASK}"]
    assert [record["epoch"] for record in harness] == [0, 2]  # epoch 0 and the last only
    for record in harness:
        assert record["id"] == [f"{TASK}:{doc}" for doc in range(DOCS)]
        assert all((margin > 0) == bool(ok) for margin, ok in zip(record["margin"], record["correct"]))
    assert harness[0]["logprob"] != harness[1]["logprob"]  # the trained weights were scored, not the untouched
    rows = [json.loads(line) for line in (runs["fast"] / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["lm_eval"] is None and rows[0]["lm_eval"][TASK]["forgotten"] == 0
    last = rows[2]["lm_eval"][TASK]
    before, after = harness[0]["correct"], harness[1]["correct"]
    assert last["docs"] == DOCS and last["accuracy"] == sum(after) / DOCS
    assert last["forgotten"] == sum(1 for was, now in zip(before, after) if was and not now)
    assert json.loads((runs["fast"] / "run.json").read_text())["metrics"][-1]["lm_eval"] == rows[2]["lm_eval"]

    outcomes = [question_outcomes(read_question_records(runs[name])) for name in ("slow", "fast")]
    paired = compare_outcomes([tuple(outcomes)], {f"lm-eval:{TASK}": f"lm-eval:{TASK}"})[f"lm-eval:{TASK}"]
    assert paired["n"] == DOCS and paired["low"] <= paired["difference"] <= paired["high"]
    compared = invoke(["compare", str(runs["slow"]), str(runs["fast"])])
    assert compared.exit_code == 0, compared.output
    assert f"forgotten (lm-eval:{TASK})" in compared.output
    row = next(line for line in compared.output.splitlines() if line.startswith("│ fast") and "[" in line)
    assert "p=" in row.split("│")[-2]  # the lm-eval column: an interval and a p-value


@needs_lm_eval
def test_lm_eval_leaves_training_alone_and_a_run_resumes(tiny_model_dir, files, task_dir, tmp_path):  # noqa: F811
    from cpl_masks.training.request import RunRequest
    from cpl_masks.training.run import start_run

    inject, mastered = files
    request = RunRequest(
        inject=str(inject),
        mastered=str(mastered),
        out=str(tmp_path / "stopped"),
        model=str(tiny_model_dir),
        mode="full",
        device="cpu",
        threads=1,
        lm_eval_tasks=[TASK],
        lm_eval_include=str(task_dir),
    )
    request.config.epochs, request.config.lr, request.config.show_progress = 2, 0.05, False

    def stop(rows):
        if rows[-1]["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        start_run(request, on_epoch=stop)
    resumed = invoke(["train", "--resume", str(tmp_path / "stopped"), *lm_eval_args(task_dir)])  # repeated: allowed
    assert resumed.exit_code == 0, resumed.output
    records = read_question_records(tmp_path / "stopped")
    assert [r["epoch"] for r in records if r["set"].startswith("lm-eval:")] == [0, 2]

    plain = train_args(tiny_model_dir, files, tmp_path / "plain", "--method", "full", "--epochs", "2")
    plain[plain.index("--lr") + 1] = "0.05"
    assert invoke(plain).exit_code == 0
    own = [r for r in read_question_records(tmp_path / "plain") if r["epoch"] > 0]
    assert own == [r for r in records if r["epoch"] > 0 and not r["set"].startswith("lm-eval:")]


@needs_lm_eval
def test_scoring_puts_the_random_generators_back(tiny, task_dir):
    import random

    import numpy as np
    import torch

    from cpl_masks.evaluation.harness import score_tasks

    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    scores = score_tasks(tiny.model, tiny.tokenizer, [TASK], include=str(task_dir), limit=3, batch_size=4)
    assert list(scores) == [TASK] and len(scores[TASK].ids) == 3  # --lm-eval-limit: the first N docs
    assert random.getstate() == states[0] and (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2])


@needs_lm_eval
def test_an_unknown_task_is_one_line_before_anything(tiny_model_dir, files, task_dir, tmp_path, monkeypatch):  # noqa: F811
    import cpl_masks.training.run as run

    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    args = train_args(tiny_model_dir, files, tmp_path / "run", "--method", "full")
    result = invoke([*args, "--lm-eval-tasks", f"{TASK},no_such_task_xyz", "--lm-eval-include", str(task_dir)])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "no_such_task_xyz" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_without_lm_eval_installed_the_error_says_how_to_install(tiny_model_dir, files, tmp_path, monkeypatch):  # noqa: F811
    import cpl_masks.training.run as run

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    args = train_args(tiny_model_dir, files, tmp_path / "run", "--method", "full", "--lm-eval-tasks", "arc_easy")
    result = invoke(args)
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0
    assert "pip install 'cpl-masks[lm-eval]'" in result.output and not (tmp_path / "run").exists()

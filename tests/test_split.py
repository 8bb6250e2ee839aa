"""``cpl-masks split`` end to end through the CLI, and the library call behind it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cpl_masks.cli.app import app
from cpl_masks.data.questions import load_questions
from cpl_masks.data.split import split_questions, split_scores, write_split
from cpl_masks.errors import CplError
from cpl_masks.models import load_model, model_fingerprint
from cpl_masks.scoring.scorers import make_scorer, score_questions
from tests.conftest import SHARED_DATA, make_questions, write_rows

runner = CliRunner()


def run_split(*args: str):
    return runner.invoke(app, ["split", *args], catch_exceptions=False)


def test_split_writes_sets_that_match_the_model(tiny_model_dir, question_file, tmp_path):
    out = tmp_path / "split"
    result = run_split("--model", str(tiny_model_dir), "--data", str(question_file), "--out", str(out),
                       "--holdout-fraction", "0.5", "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "mastered (M)" in result.output
    mastered, inject = load_questions(out / "mastered.jsonl"), load_questions(out / "inject.jsonl")
    heldout = load_questions(out / "mastered_heldout.jsonl") if (out / "mastered_heldout.jsonl").exists() else []
    summary = json.loads((out / "split.json").read_text())
    counts = {"mastered": len(mastered), "heldout": len(heldout), "pool": 0, "inject": len(inject), "uncertain": 0}
    assert summary["counts"] == counts
    assert len(mastered) + len(heldout) + len(inject) == 24 and abs(len(heldout) - len(mastered)) <= 1
    loaded = load_model(str(tiny_model_dir), device="cpu")
    assert summary["model"]["fingerprint"] == model_fingerprint(loaded.model)
    scores = score_questions(loaded.model, make_scorer("letter", loaded.tokenizer), load_questions(question_file))
    assert summary["accuracy"] == pytest.approx(scores.accuracy)
    right = {q.id for q, ok in zip(load_questions(question_file), scores.correct) if ok}
    assert {q.id for q in mastered + heldout} == right and not right & {q.id for q in inject}


def test_split_refuses_a_non_empty_folder_without_overwrite(tiny_model_dir, question_file, tmp_path):
    out = tmp_path / "split"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run_split("--model", str(tiny_model_dir), "--data", str(question_file), "--out", str(out))
    assert result.exit_code == 2
    assert f"error: --out {out}: folder is not empty; pass --overwrite" in result.output
    assert (out / "keep.txt").read_text() == "precious"
    again = run_split("--model", str(tiny_model_dir), "--data", str(question_file), "--out", str(out), "--overwrite")
    assert again.exit_code == 0 and (out / "split.json").exists()


def test_split_reports_bad_data_in_one_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q?", "choices": ["a", "b"], "answer": "C"}\n')
    result = run_split("--model", str(tiny_model_dir), "--data", str(bad), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert f"error: {bad}: row 1: answer 'C' is not among the 2 choices" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


def test_split_refuses_a_question_longer_than_the_context_before_scoring(tiny_model_dir, tmp_path, monkeypatch):
    import cpl_masks.data.split as split_module

    rows = [{"id": "ok", "question": "what is the capital?", "choices": ["paris", "rome"], "answer": "A"}]
    rows += ["", {"id": "huge", "question": "the " * 2000, "choices": ["paris", "rome"], "answer": "B"}]
    data = write_rows(tmp_path / "long.jsonl", rows)

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before the length check")

    monkeypatch.setattr(split_module, "score_questions", no_scoring)
    result = run_split("--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                       "--scoring", "loglik", "--device", "cpu")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"error: {data}: row 3: question is " in result.output
    assert "tokens, longer than the model's context (512)" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["split", "sweep"])
@pytest.mark.parametrize("limit", ["0", "-5"])
def test_limit_below_one_is_refused_in_one_line(tiny_model_dir, question_file, tmp_path, command, limit):
    out = tmp_path / "o"
    result = runner.invoke(
        app,
        [command, "--model", str(tiny_model_dir), "--data", str(question_file), "--out", str(out), "--limit", limit],
        catch_exceptions=False,
    )
    assert result.exit_code == 2
    assert result.output.strip() == f"error: --limit {limit}: must be at least 1 (or left out for all questions)"
    assert not out.exists()


def test_holdout_sample_is_seeded(tiny):
    questions = make_questions(40, seed=5)
    first = split_questions(tiny, questions, holdout_fraction=0.3, seed=1, show_progress=False)
    second = split_questions(tiny, questions, holdout_fraction=0.3, seed=1, show_progress=False)
    assert [q.id for q in first.heldout] == [q.id for q in second.heldout]
    assert len(first.heldout) == round((len(first.heldout) + len(first.mastered)) * 0.3)


def test_cli_package_imports_from_any_folder(tmp_path):
    for folder in (Path(__file__).resolve().parents[1], tmp_path):
        done = subprocess.run([sys.executable, "-c", "import cpl_masks.cli, cpl_masks.registry"], cwd=folder)
        assert done.returncode == 0, folder
    top_level = subprocess.run([sys.executable, "-c", "import cli"], cwd=tmp_path, capture_output=True)
    assert top_level.returncode != 0  # nothing called plain `cli` is installed


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "arc_challenge.jsonl").exists(), reason="../shared/data is absent")
def test_split_on_smollm2_over_arc(tmp_path):
    out = tmp_path / "arc"
    result = run_split("--data", str(SHARED_DATA / "arc_challenge.jsonl"), "--limit", "16", "--out", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "split.json").read_text())
    assert summary["model"]["ref"] == "smollm2-135m-instruct" and summary["data"]["rows"] == 16
    assert sum(summary["counts"].values()) == 16


def test_recorded_scoring_reads_split_json_beside_a_question_file(tmp_path):
    from cpl_masks.data.split import recorded_scoring
    from cpl_masks.errors import CplError

    data = tmp_path / "inject.jsonl"
    assert recorded_scoring(data) is None
    (tmp_path / "split.json").write_text(json.dumps({"scoring": "loglik-norm"}))
    assert recorded_scoring(data) == "loglik-norm"
    for broken in ("{not json", json.dumps({"counts": {}}), json.dumps({"scoring": 3})):
        (tmp_path / "split.json").write_text(broken)
        with pytest.raises(CplError, match="split.json: .*pass --scoring"):
            recorded_scoring(data)


def test_min_margin_keeps_narrow_wins_out_of_the_mastered_set(tiny, tmp_path):
    questions = make_questions(30, seed=9)
    plain = split_questions(tiny, questions, scoring="loglik", show_progress=False)
    margins = sorted(plain.scores[q.id]["margins"] for q in plain.mastered)
    cut = margins[len(margins) // 2]  # about half of the right answers win by less than this
    strict = split_questions(tiny, questions, scoring="loglik", min_margin=cut, show_progress=False)
    assert {q.id for q in strict.mastered} == {q.id for q in plain.mastered if plain.scores[q.id]["margins"] >= cut}
    assert [q.id for q in strict.inject] == [q.id for q in plain.inject]
    assert strict.summary["counts"]["uncertain"] == len(plain.mastered) - len(strict.mastered) > 0
    assert strict.summary["min_margin"] == cut
    with pytest.raises(CplError, match="--min-margin -1"):
        split_questions(tiny, questions, min_margin=-1.0)


def test_split_scores_stand_in_for_epoch_zero_only_for_the_same_weights_and_files(tiny, tmp_path):
    questions = make_questions(20, seed=3)
    split = split_questions(tiny, questions, scoring="loglik", holdout_fraction=0.3, show_progress=False)
    folder = write_split(split, tmp_path / "split")
    sets = {"inject": load_questions(folder / "inject.jsonl"), "mastered": load_questions(folder / "mastered.jsonl")}
    fingerprint = model_fingerprint(tiny.model)
    known = split_scores(folder / "inject.jsonl", sets, fingerprint=fingerprint, scoring="loglik")
    fresh = score_questions(tiny.model, make_scorer("loglik", tiny.tokenizer), sets["mastered"], show_progress=False)
    assert known["mastered"].correct == fresh.correct
    assert known["mastered"].margins == pytest.approx(fresh.margins, abs=1e-4)
    assert split_scores(folder / "inject.jsonl", sets, fingerprint="0" * 64, scoring="loglik") is None
    assert split_scores(folder / "inject.jsonl", sets, fingerprint=fingerprint, scoring="letter") is None
    edited = {**sets, "mastered": sets["mastered"][1:]}  # not one of the split's files any more
    assert split_scores(folder / "inject.jsonl", edited, fingerprint=fingerprint, scoring="loglik") is None

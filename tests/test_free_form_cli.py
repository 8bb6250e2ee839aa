"""Free-form data through every command on the tiny model: split, profile (mask, retain sets), train, compare, sweep."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from cpl_masks.cli.app import app
from cpl_masks.data.questions import load_questions
from cpl_masks.hub import card_rows
from cpl_masks.masks.format import Mask
from tests.conftest import WORDS, make_questions, write_rows

runner = CliRunner()


def cli(*args: str) -> str:
    result = runner.invoke(app, [str(arg) for arg in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def pairs(tiny, tmp_path_factory):
    """40 prompt-completion rows: half the tiny model's own greedy continuations (some it reproduces), half not."""
    rng = random.Random(0)
    rows = []
    for index in range(40):
        prompt = " ".join(rng.choices(WORDS, k=5))
        ids = tiny.tokenizer(prompt, return_tensors="pt")["input_ids"]
        greedy = tiny.model.generate(ids, max_new_tokens=3, do_sample=False)[0, ids.shape[1] :]
        completion = tiny.tokenizer.decode(greedy) if index % 2 else " " + " ".join(rng.choices(WORDS, k=2))
        rows.append({"id": f"p{index}", "prompt": prompt, "completion": completion})
    return write_rows(tmp_path_factory.mktemp("free") / "pairs.jsonl", rows)


def common(tiny_model_dir) -> list[str]:
    return ["--model", str(tiny_model_dir), "--device", "cpu", "--threads", "1"]


def test_split_profile_train_and_compare_on_prompt_completion_pairs(tiny_model_dir, pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("CPL_MASKS_HOME", str(tmp_path / "home"))
    pool = write_rows(tmp_path / "pool.jsonl", [q.to_record() for q in make_questions(30, seed=9, prefix="mc")])
    split = tmp_path / "split"
    cli("split", "--data", pairs, "--heldout-data", pool, "--holdout-fraction", "0.3", "--out", split,
        *common(tiny_model_dir))  # fmt: skip
    counts = json.loads((split / "split.json").read_text())["counts"]
    assert counts["mastered"] > 0 and counts["inject"] > 0 and counts["pool"] > 0
    heldout = load_questions(split / "mastered_heldout.jsonl")  # free-form held-out items beside the MCQ pool
    assert {item.form for item in heldout} == {"prompt-completion", "multiple-choice"}

    mastered, inject = split / "mastered.jsonl", split / "inject.jsonl"
    cli("profile", "--mastered", mastered, "--inject", inject, "--name", "pairs",
        "--out", tmp_path / "mask.safetensors", *common(tiny_model_dir))  # fmt: skip
    mask = Mask.load(tmp_path / "mask.safetensors")
    assert mask.metadata["loss_on"] == "completion" and "completion" in mask.metadata["loss"]
    assert mask.metadata["data"]["inject"]["format"] == "prompt-completion"
    card = dict(card_rows(mask, "pairs@v1"))  # the Hub card says what the mask was profiled on
    assert "(prompt-completion)" in card["data: inject"] and card["loss"] == mask.metadata["loss"]
    cli("profile", "--kind", "retain", "--mastered", mastered, "--out", tmp_path / "free.retain.safetensors",
        *common(tiny_model_dir))  # fmt: skip
    cli("profile", "--kind", "retain", "--objective", "choices", "--mastered", pool,
        "--out", tmp_path / "mcq.retain.safetensors", *common(tiny_model_dir))  # fmt: skip

    train = ["train", "--inject", inject, "--mastered", mastered, "--heldout", split / "mastered_heldout.jsonl",
             "--epochs", "2", "--lr", "0.01", "--optimizer", "adamw", *common(tiny_model_dir)]  # fmt: skip
    cli(*train, "--method", "full", "--out", tmp_path / "full")
    cli(*train, "--mask", tmp_path / "mask.safetensors", "--out", tmp_path / "cpl")
    cli(*train, "--retain", tmp_path / "free.retain.safetensors", "--out", tmp_path / "free")
    cli(*train, "--retain", tmp_path / "mcq.retain.safetensors", "--loss-on", "all", "--out", tmp_path / "mcq")
    final = json.loads((tmp_path / "full" / "run.json").read_text())["final"]
    assert final["delta_logprob"]["inject"] > 1.0 and final["forgotten"] > 0  # completions learned, others pushed out
    assert json.loads((tmp_path / "mcq" / "config.json").read_text())["request"]["loss_on"] == "all"
    records = [json.loads(line) for line in (tmp_path / "cpl" / "questions.jsonl").read_text().splitlines()]
    scored = {key for record in records if record["set"] == "heldout" for key in record["id"]}
    assert scored == {item.id for item in heldout}  # the pool's questions and the held-out items, each by its rule

    compared = cli("compare", tmp_path / "full", tmp_path / "cpl", tmp_path / "free", tmp_path / "mcq")
    assert "paired by question against full" in compared


def test_a_conversational_set_trains_through_the_chat_template(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CPL_MASKS_HOME", str(tmp_path / "home"))
    chats = [{"id": f"c{i}", "messages": [{"role": "user", "content": f"name {i}"},
                                          {"role": "assistant", "content": WORDS[i]}]} for i in range(8)]  # fmt: skip
    inject = write_rows(tmp_path / "inject.jsonl", chats[:4])
    mastered = write_rows(tmp_path / "mastered.jsonl", chats[4:])
    cli("profile", "--mastered", mastered, "--inject", inject, "--out", tmp_path / "mask.safetensors",
        *common(tiny_model_dir))  # fmt: skip
    out = cli("train", "--mask", tmp_path / "mask.safetensors", "--inject", inject, "--mastered", mastered,
              "--epochs", "1", "--lr", "0.05", "--out", tmp_path / "run", *common(tiny_model_dir))  # fmt: skip
    assert "learned" in out
    assert Mask.load(tmp_path / "mask.safetensors").metadata["data"]["mastered"]["format"] == "messages"


def test_a_sweep_runs_on_free_form_data(tiny_model_dir, pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("CPL_MASKS_HOME", str(tmp_path / "home"))
    out = tmp_path / "sweep"
    cli("sweep", "--data", pairs, "--out", out, "--methods", "full,mask,dynamic", "--lr-grid", "0.05",
        "--epochs", "1", "--holdout-fraction", "0.3", "--forgetting-budget", "1.0",
        *common(tiny_model_dir))  # fmt: skip
    payload = json.loads((out / "sweep.json").read_text())
    assert [run["method"] for run in payload["runs"]] == ["full", "mask", "dynamic"]


def test_bad_free_form_input_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path):
    bad = write_rows(tmp_path / "bad.jsonl", [{"prompt": "hi", "completion": "yo"}, {"text": "plain"}])
    result = runner.invoke(app, ["split", "--data", str(bad), "--out", str(tmp_path / "out"), *common(tiny_model_dir)])
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    assert result.output.strip().splitlines() == [
        f"error: {bad}: row 2 is a text row but row 1 is prompt-completion; one file holds one free-form format"
    ]
    result = runner.invoke(app, ["profile", "--mastered", str(bad), "--inject", str(bad), "--loss-on", "prompt"])
    assert result.exit_code == 2 and "--loss-on prompt: choose one of completion, all" in result.output

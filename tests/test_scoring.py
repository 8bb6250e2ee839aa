"""Scoring: batched results equal one-at-a-time results; predictions and losses mean what they say."""

from __future__ import annotations

import pytest
import torch

from cpl_masks.data import Question
from cpl_masks.errors import CplError
from cpl_masks.models import load_model
from cpl_masks.scoring import LetterScorer, context_length, make_scorer, pad_left, score_questions
from tests.conftest import make_questions, write_rows

QUESTIONS = make_questions(12, seed=3)
LONG_ROW = {"id": "long", "question": "the " * 600, "choices": ["paris", "rome"], "answer": "A"}  # > 512 tokens


@pytest.mark.parametrize("scoring", ["letter", "loglik", "loglik-norm"])
def test_batched_equals_one_at_a_time(tiny, scoring):
    scorer = make_scorer(scoring, tiny.tokenizer)
    batched = score_questions(tiny.model, scorer, QUESTIONS, batch_size=5, show_progress=False)
    single = score_questions(tiny.model, scorer, QUESTIONS, batch_size=1, show_progress=False)
    assert batched.predictions == single.predictions
    assert batched.losses == pytest.approx(single.losses, abs=1e-5)
    differentiable = scorer.loss(tiny.model, QUESTIONS[:5])
    assert differentiable.requires_grad
    assert differentiable.tolist() == pytest.approx(single.losses[:5], abs=1e-5)


def test_letter_prediction_is_argmax_over_the_question_letters(tiny):
    scorer = LetterScorer(tiny.tokenizer)
    question = QUESTIONS[0]
    ids = torch.tensor([scorer._prompt_ids(question)])
    with torch.no_grad():
        logits = tiny.model(ids).logits[0, -1]
    letter_logits = logits[scorer.letter_ids[: len(question.choices)]]
    table, loss = scorer.choice_scores(tiny.model, [question])
    predicted = table.argmax(-1)
    assert int(predicted[0]) == int(letter_logits.argmax())
    expected = -torch.log_softmax(logits, -1)[scorer.letter_ids[question.answer]]
    assert float(loss[0]) == pytest.approx(float(expected), abs=1e-5)


def test_letter_prompt_uses_chat_template_and_lists_letters(tiny, tiny_base_model_dir):
    prompt = LetterScorer(tiny.tokenizer).prompt_text(QUESTIONS[0])
    letters = "ABCDE"[: len(QUESTIONS[0].choices)]
    assert prompt.startswith("<|im_start|>user\nQuestion: ") and prompt.endswith("<|im_start|>assistant\n")
    assert all(f"\n{letter}: " in prompt for letter in letters)
    base = load_model(str(tiny_base_model_dir), device="cpu")
    assert LetterScorer(base.tokenizer).prompt_text(QUESTIONS[0]).endswith("\nAnswer:")
    single = score_questions(
        base.model, make_scorer("letter", base.tokenizer), QUESTIONS, batch_size=1, show_progress=False
    )
    batched = score_questions(
        base.model, make_scorer("letter", base.tokenizer), QUESTIONS, batch_size=4, show_progress=False
    )
    assert batched.losses == pytest.approx(single.losses, abs=1e-5)


def _choice_logprobs(loaded, question, choice: int) -> torch.Tensor:
    """Log-probability of each token of a choice after ``Question: ...\nAnswer:``, computed from scratch."""
    tokenizer = loaded.tokenizer
    context = [tokenizer.bos_token_id] + tokenizer(f"Question: {question.question}\nAnswer:")["input_ids"]
    full = [tokenizer.bos_token_id] + tokenizer(f"Question: {question.question}\nAnswer: {question.choices[choice]}")[
        "input_ids"
    ]
    assert full[: len(context)] == context and len(full) > len(context)  # the choice only appends tokens
    with torch.no_grad():
        logprobs = torch.log_softmax(loaded.model(torch.tensor([full])).logits[0].float(), -1)  # (T, V)
    positions = torch.arange(len(context), len(full))  # the choice's tokens, each predicted one position earlier
    return logprobs[positions - 1, torch.tensor(full[len(context) :])]  # (choice tokens,)


@pytest.mark.parametrize("scoring", ["loglik", "loglik-norm"])
def test_loglik_scores_are_the_choice_tokens_log_probabilities(tiny, scoring):
    questions = QUESTIONS[:4]
    table, losses = make_scorer(scoring, tiny.tokenizer).choice_scores(tiny.model, questions)
    for row, question in enumerate(questions):
        per_choice = [_choice_logprobs(tiny, question, choice) for choice in range(len(question.choices))]
        expected = [float(lp.mean() if scoring == "loglik-norm" else lp.sum()) for lp in per_choice]
        assert table[row, : len(question.choices)].tolist() == pytest.approx(expected, abs=1e-4)
        assert float(losses[row]) == pytest.approx(-float(per_choice[question.answer].mean()), abs=1e-4)
        assert int(table[row].argmax()) == max(range(len(expected)), key=expected.__getitem__)


def test_context_length_is_the_models_position_limit(tiny):
    assert context_length(tiny.model) == tiny.model.config.max_position_embeddings == 512


@pytest.mark.parametrize("scoring", ["letter", "loglik", "loglik-norm"])
def test_questions_longer_than_the_context_are_refused_naming_file_and_row(tiny, scoring):
    scorer = make_scorer(scoring, tiny.tokenizer)
    scorer.check_fits(tiny.model, QUESTIONS)  # short ones pass
    fits = Question(id="q", question="the " * 380, choices=("paris", "rome"), answer=0, source="big.jsonl", row=7)
    too_long = Question(id="q", question="the " * 600, choices=("paris", "rome"), answer=0, source="big.jsonl", row=7)
    scorer.check_fits(tiny.model, [fits])
    with pytest.raises(CplError) as caught:
        scorer.check_fits(tiny.model, [*QUESTIONS, too_long])
    tokens = scorer.sequence_length(too_long)
    assert tokens > 600
    assert str(caught.value) == f"big.jsonl: row 7: question is {tokens} tokens, longer than the model's context (512)"


def test_profile_and_training_refuse_an_over_long_question_naming_its_file_and_row(tiny, tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from cpl_masks.cli.app import app
    from cpl_masks.data import load_questions
    from cpl_masks.profile import profile

    inject = write_rows(tmp_path / "inject.jsonl", [q.to_record() for q in QUESTIONS[:3]] + ["", LONG_ROW])
    mastered = write_rows(tmp_path / "mastered.jsonl", [q.to_record() for q in QUESTIONS[3:6]])
    with pytest.raises(CplError, match=f"^{inject}: row 5: question is \\d+ tokens, longer than the model's context"):
        profile(tiny, load_questions(mastered), load_questions(inject), show_progress=False)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["train", "--data", str(inject), "--mastered", str(mastered), "--out", str(out), "--mode", "full",
         "--model", str(tiny_model_dir), "--device", "cpu", "--epochs", "1"],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"error: {inject}: row 5: question is " in result.output
    assert "longer than the model's context (512)" in result.output


def test_loglik_length_counts_the_longest_choice(tiny):
    scorer = make_scorer("loglik", tiny.tokenizer)
    short = Question(id="q", question="what is the capital?", choices=("paris", "rome"), answer=0)
    long = Question(id="q", question="what is the capital?", choices=("paris", "rome " * 50), answer=0)
    assert scorer.sequence_length(long) >= scorer.sequence_length(short) + 49


def test_pad_left_positions_start_at_zero():
    batch = pad_left([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_unknown_scoring_and_bad_batch_size(tiny):
    with pytest.raises(CplError, match="--scoring nope: choose one of letter, loglik, loglik-norm"):
        make_scorer("nope", tiny.tokenizer)
    with pytest.raises(CplError, match="--batch-size 0"):
        score_questions(tiny.model, make_scorer("letter", tiny.tokenizer), QUESTIONS, batch_size=0)


def test_scores_carry_the_correct_choices_log_probability_and_margin(tiny):
    scorer = LetterScorer(tiny.tokenizer)
    scores = score_questions(tiny.model, scorer, QUESTIONS, batch_size=3, show_progress=False)
    for index, question in enumerate(QUESTIONS):
        ids = torch.tensor([scorer._prompt_ids(question)])
        with torch.no_grad():
            logprobs = torch.log_softmax(tiny.model(ids).logits[0, -1], -1)  # (V,)
        letters = logprobs[scorer.letter_ids[: len(question.choices)]]  # (C,)
        wrong = torch.cat([letters[: question.answer], letters[question.answer + 1 :]])
        assert scores.logprobs[index] == pytest.approx(float(letters[question.answer]), abs=1e-4)
        assert scores.margins[index] == pytest.approx(float(letters[question.answer] - wrong.max()), abs=1e-4)
        assert (scores.margins[index] > 0) == scores.correct[index]

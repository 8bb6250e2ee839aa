"""Scoring: batched results equal one-at-a-time results; predictions and losses mean what they say."""

from __future__ import annotations

import pytest
import torch

from cpl_masks.errors import CplError
from cpl_masks.models import load_model
from cpl_masks.scoring import LetterScorer, make_scorer, pad_left, score_questions
from tests.conftest import make_questions

QUESTIONS = make_questions(12, seed=3)


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


def test_loglik_prefers_the_choice_with_higher_likelihood(tiny):
    scorer = make_scorer("loglik", tiny.tokenizer)
    question = QUESTIONS[1]
    total, counts = scorer._token_nll(tiny.model, [scorer._row_ids(question, c) for c in range(len(question.choices))])
    predicted = scorer.choice_scores(tiny.model, [question])[0].argmax(-1)
    assert int(predicted[0]) == int(total.argmin())
    normalized = make_scorer("loglik-norm", tiny.tokenizer).choice_scores(tiny.model, [question])[0].argmax(-1)
    assert int(normalized[0]) == int((total / counts).argmin())


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

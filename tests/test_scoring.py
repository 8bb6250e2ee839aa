"""Scoring: batched results equal one-at-a-time results; predictions and losses mean what they say."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from cpl_masks.data.questions import Question
from cpl_masks.errors import CplError
from cpl_masks.models import load_model
from cpl_masks.scoring.scorers import (
    LetterScorer,
    LoglikScorer,
    choice_scorer,
    context_length,
    pad_left,
    score_questions,
)
from tests.conftest import TINY_DIMENSIONS, make_questions, write_rows

QUESTIONS = make_questions(12, seed=3)
LONG_ROW = {"id": "long", "question": "the " * 600, "choices": ["paris", "rome"], "answer": "A"}  # > 512 tokens


@pytest.mark.parametrize("scoring", ["letter", "loglik", "loglik-norm"])
def test_batched_equals_one_at_a_time(tiny, scoring):
    scorer = choice_scorer(scoring, tiny.tokenizer)
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
        base.model, choice_scorer("letter", base.tokenizer), QUESTIONS, batch_size=1, show_progress=False
    )
    batched = score_questions(
        base.model, choice_scorer("letter", base.tokenizer), QUESTIONS, batch_size=4, show_progress=False
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


@pytest.mark.parametrize("path", ["shared", "per-choice"])
@pytest.mark.parametrize("scoring", ["loglik", "loglik-norm"])
def test_loglik_scores_are_the_choice_tokens_log_probabilities(tiny, scoring, path):
    questions = QUESTIONS[:4]
    table, losses = choice_scorer(scoring, tiny.tokenizer, loglik_path=path).choice_scores(tiny.model, questions)
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
    scorer = choice_scorer(scoring, tiny.tokenizer)
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
    from cpl_masks.data.questions import load_questions
    from cpl_masks.profiling.freeze_mask import profile

    inject = write_rows(tmp_path / "inject.jsonl", [q.to_record() for q in QUESTIONS[:3]] + ["", LONG_ROW])
    mastered = write_rows(tmp_path / "mastered.jsonl", [q.to_record() for q in QUESTIONS[3:6]])
    with pytest.raises(CplError, match=f"^{inject}: row 5: question is \\d+ tokens, longer than the model's context"):
        profile(tiny, load_questions(mastered), load_questions(inject), show_progress=False)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["train", "--inject", str(inject), "--mastered", str(mastered), "--out", str(out), "--method", "full",
         "--model", str(tiny_model_dir), "--device", "cpu", "--epochs", "1"],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"error: {inject}: row 5: question is " in result.output
    assert "longer than the model's context (512)" in result.output


def test_loglik_length_counts_the_longest_choice(tiny):
    scorer = choice_scorer("loglik", tiny.tokenizer)
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
        choice_scorer("nope", tiny.tokenizer)
    with pytest.raises(CplError, match="--batch-size 0"):
        score_questions(tiny.model, choice_scorer("letter", tiny.tokenizer), QUESTIONS, batch_size=0)


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


MIXED = [
    *make_questions(6, seed=11),
    Question(id="long", question=" ".join(["the capital of france is paris"] * 40), choices=("a", "b"), answer=1),
    Question(
        id="uneven",  # choices of 1, 2 and many tokens
        question="which city?",
        choices=("paris", "rome berlin", "the largest red planet with two moons and one sun"),
        answer=2,
    ),
    *make_questions(4, seed=12, prefix="r"),
]


@pytest.mark.parametrize("scoring", ["loglik", "loglik-norm"])
def test_shared_context_scores_equal_the_per_choice_path(tiny, scoring):
    shared = choice_scorer(scoring, tiny.tokenizer)
    per_choice = choice_scorer(scoring, tiny.tokenizer, loglik_path="per-choice")
    assert shared.uses_shared_path(tiny.model, MIXED) and not per_choice.uses_shared_path(tiny.model, MIXED)
    lengths = [shared.sequence_length(q) for q in MIXED]
    assert max(lengths) > 200 and min(lengths) < 30  # one batch mixes short and long questions
    counts = [count for _, count in (shared._row_ids(MIXED[7], c) for c in range(3))]
    assert len(set(counts)) == 3  # the uneven question's choices are 3 different token lengths
    for start in range(0, len(MIXED), 6):
        batch = MIXED[start : start + 6]
        table, losses = shared.choice_scores(tiny.model, batch)
        expected, expected_losses = per_choice.choice_scores(tiny.model, batch)
        assert torch.isinf(table).equal(torch.isinf(expected))
        finite = torch.isfinite(expected)
        assert (table[finite] - expected[finite]).abs().max() < 1e-4
        assert (losses - expected_losses).abs().max() < 1e-4
    got = score_questions(tiny.model, shared, MIXED, batch_size=5, show_progress=False)
    want = score_questions(tiny.model, per_choice, MIXED, batch_size=5, show_progress=False)
    assert got.predictions == want.predictions and got.correct == want.correct
    assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    assert got.margins == pytest.approx(want.margins, abs=1e-4)


class _MergingScorer(LoglikScorer):
    """Rows as a tokenizer that merges across the context/continuation boundary makes them.

    Choice 1's last context token becomes another id, and choice 2 scores the last context token
    too, so the choices' rows share less than the whole context.
    """

    def _build_row_ids(self, question, choice):
        ids, count = super()._build_row_ids(question, choice)
        if choice == 1:
            cut = len(ids) - count - 1
            return (*ids[:cut], (ids[cut] + 1) % 300, *ids[cut + 1 :]), count
        if choice == 2:
            return ids, count + 1
        return ids, count


def test_shared_context_scores_choices_that_share_less_than_the_context(tiny):
    questions = [q for q in MIXED if len(q.choices) >= 3]
    shared = _MergingScorer(tiny.tokenizer, normalize=False)
    per_choice = _MergingScorer(tiny.tokenizer, normalize=False, path="per-choice")
    layout = shared._layout(questions[0])
    assert layout.prefix == len(shared._row_ids(questions[0], 0)[0]) - layout.counts[0] - 1
    assert layout.branches[0] == layout.counts[0] + 1 and layout.branches[2] == layout.counts[2]
    table, _ = shared.choice_scores(tiny.model, questions)
    expected, _ = per_choice.choice_scores(tiny.model, questions)
    finite = torch.isfinite(expected)
    assert (table[finite] - expected[finite]).abs().max() < 1e-4


class _Wrapped(torch.nn.Module):
    """The tiny model behind another config, optionally dropping any 4D attention mask it is given."""

    def __init__(self, model, *, drop_4d_masks=False, **config):
        super().__init__()
        self.inner = model
        self.config = copy.deepcopy(model.config)
        for key, value in config.items():
            setattr(self.config, key, value)
        self.drop_4d_masks = drop_4d_masks

    @property
    def device(self):
        return self.inner.device

    def forward(self, **inputs):
        mask = inputs.get("attention_mask")
        if self.drop_4d_masks and mask is not None and mask.dim() == 4:
            inputs["attention_mask"] = None
        return self.inner(**inputs)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"drop_4d_masks": True}, "shared-context scores differ from the per-choice scores"),
        ({"_attn_implementation": "flash_attention_2"}, r"attention implementation \(flash_attention_2\) takes no 4D"),
    ],
)
def test_a_model_that_cannot_take_the_shared_path_falls_back_saying_so_once(tiny, options, message):
    model = _Wrapped(tiny.model, **options)
    scorer = choice_scorer("loglik", tiny.tokenizer)
    with pytest.warns(UserWarning, match=f"falls back to one sequence per choice: its {message}"):
        scores = score_questions(model, scorer, MIXED, batch_size=4, show_progress=False)
    assert not scorer.uses_shared_path(model, MIXED)
    assert scorer.uses_shared_path(tiny.model, MIXED)  # decided per model
    expected = score_questions(
        tiny.model, choice_scorer("loglik", tiny.tokenizer, loglik_path="per-choice"), MIXED, show_progress=False
    )
    assert scores.logprobs == pytest.approx(expected.logprobs, abs=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        score_questions(model, scorer, MIXED[:3], show_progress=False)  # said once


def test_questions_past_a_sliding_window_are_scored_per_choice(tiny):
    model = _Wrapped(tiny.model, sliding_window=64)
    scorer = choice_scorer("loglik", tiny.tokenizer)
    short = [q for q in MIXED if scorer.sequence_length(q) <= 64]
    assert scorer.uses_shared_path(model, short)
    with pytest.warns(UserWarning, match=r"longer than the model's sliding attention window \(64 tokens\)"):
        assert not scorer.uses_shared_path(model, MIXED)


def test_unknown_loglik_path_is_refused(tiny):
    with pytest.raises(CplError, match="loglik path 'packed': choose one of shared, per-choice"):
        choice_scorer("loglik", tiny.tokenizer, loglik_path="packed")


class _Recording(LoglikScorer):
    def __init__(self, tokenizer):
        super().__init__(tokenizer, normalize=False)
        self.batches = []

    def choice_scores(self, model, questions):
        self.batches.append([self.batch_key(q) for q in questions])
        return super().choice_scores(model, questions)


def test_questions_are_batched_by_length_and_returned_in_input_order(tiny):
    scorer = _Recording(tiny.tokenizer)
    scores = score_questions(tiny.model, scorer, MIXED, batch_size=4, show_progress=False)
    keys = [key for batch in scorer.batches for key in batch]
    assert keys == sorted(scorer.batch_key(q) for q in MIXED)
    one_by_one = [score_questions(tiny.model, scorer, [q], show_progress=False) for q in MIXED]
    assert scores.predictions == [single.predictions[0] for single in one_by_one]
    assert scores.logprobs == pytest.approx([single.logprobs[0] for single in one_by_one], abs=1e-4)


def test_sliding_window_layers_get_the_window_in_their_mask(tiny):
    """A tiny Gemma 3 (one sliding layer of window 16, one full layer) scores long questions on the shared path."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=len(tiny.tokenizer),
        **TINY_DIMENSIONS,
        head_dim=16,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=tiny.tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    shared = choice_scorer("loglik", tiny.tokenizer)
    per_choice = choice_scorer("loglik", tiny.tokenizer, loglik_path="per-choice")
    assert max(shared.sequence_length(q) for q in MIXED) > 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        assert shared.uses_shared_path(model, MIXED)
        table, _ = shared.choice_scores(model, MIXED)
    expected, _ = per_choice.choice_scores(model, MIXED)
    finite = torch.isfinite(expected)
    assert (table[finite] - expected[finite]).abs().max() < 1e-4

"""How a model answers a multiple-choice question, and the answer loss that training descends.

Two scorings, picked by name:

* ``letter`` (the CPL paper's): the question and lettered options go through the chat template,
  the prediction is the argmax over the choice letters' logits at the last position, and the
  loss is the cross-entropy of the answer letter there (over the whole vocabulary).
* ``loglik`` / ``loglik-norm`` (lm-eval style, for base models): each choice's text is scored as a
  continuation of ``Question: ...\\nAnswer:``; the prediction maximises the summed (``loglik``) or
  per-token mean (``loglik-norm``) log-probability; the loss is the mean cross-entropy over the
  correct choice's tokens.

``loglik`` scoring runs a question's context once and every choice's continuation from it (one
packed sequence per question; see :class:`LoglikScorer`), with the old one-sequence-per-choice path
kept as the fallback. Batches are padded on the left with explicit position ids, so a question
scores the same alone or in a batch; :func:`score_questions` batches questions of similar length.
:meth:`Scorer.check_fits` refuses, before any forward pass, a question whose scored
sequence is longer than the model's context.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from cpl_masks.data.completions import Completion
from cpl_masks.data.questions import LETTERS, Item, Question
from cpl_masks.errors import CplError
from cpl_masks.scoring.base import SCORINGS, Outcome, Scorer, Scores, batches, context_length, pad_left
from cpl_masks.scoring.completion import DEFAULT_LOSS_ON, CompletionScorer
from cpl_masks.scoring.loglik import LoglikScorer
from cpl_masks.utils.progress import progress_bar


class LetterScorer(Scorer):
    """The CPL paper's scoring: read the answer letter off the last position's logits."""

    name = "letter"

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self._prompt_ids = functools.lru_cache(maxsize=None)(self._build_prompt_ids)

    def prompt_text(self, question: Question) -> str:
        """The full model input for a question, chat template applied where the tokenizer has one."""
        body = question.question if question.preformatted else self._format(question)
        if not self.chat:
            return f"{body}\nAnswer:"
        messages = [{"role": "user", "content": body}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @staticmethod
    def _format(question: Question) -> str:
        letters = LETTERS[: len(question.choices)]
        options = "\n".join(f"{letter}: {choice}" for letter, choice in zip(letters, question.choices))
        listed = (
            f"{letters[0]} or {letters[1]}" if len(letters) == 2 else ", ".join(letters[:-1]) + f", or {letters[-1]}"
        )
        return f"Question: {question.question}\nOptions:\n{options}\n\nPlease reply with only {listed}."

    def _build_prompt_ids(self, question: Question) -> list[int]:
        ids = self._encode(self.prompt_text(question))
        return ids if self.chat else self._bos() + ids

    def sequence_length(self, question: Question) -> int:
        """The prompt and the answer letter after it."""
        return len(self._prompt_ids(question)) + 1

    @functools.cached_property
    def letter_ids(self) -> list[int]:
        """Token id of each choice letter as the first token of the answer.

        Chat prompts end with the assistant header, so the answer is ``"A"``; plain prompts end with
        ``"Answer:"``, so it is ``" A"``. The other spelling is the fallback where a tokenizer splits
        the preferred one.
        """
        prefixes = ("", " ") if self.chat else (" ", "")
        for prefix in prefixes:
            ids = [self._encode(prefix + letter) for letter in LETTERS]
            if all(len(tokens) == 1 for tokens in ids):
                return [tokens[0] for tokens in ids]
        raise CplError("--scoring letter: the tokenizer has no single token for each letter A-Z; use loglik")

    def _last_logits(self, model: Any, questions: Sequence[Question]) -> torch.Tensor:
        batch = pad_left([self._prompt_ids(q) for q in questions], self.tokenizer.pad_token_id, model.device)
        return model(**batch, logits_to_keep=1, use_cache=False).logits[:, -1, :].float()  # (B, V)

    def _targets(self, questions: Sequence[Question], device: torch.device) -> torch.Tensor:
        return torch.tensor([self.letter_ids[q.answer] for q in questions], device=device)  # (B,)

    def loss(self, model: Any, questions: Sequence[Question]) -> torch.Tensor:
        logits = self._last_logits(model, questions)  # (B, V)
        return F.cross_entropy(logits, self._targets(questions, logits.device), reduction="none")

    def choice_table(self, model: Any, questions: Sequence[Question]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._last_logits(model, questions)  # (B, V)
        width = max(len(q.choices) for q in questions)
        letter_logprobs = logits.log_softmax(-1)[:, self.letter_ids[:width]]  # (B, C)
        counts = torch.tensor([len(q.choices) for q in questions], device=logits.device)
        absent = torch.arange(width, device=logits.device)[None, :] >= counts[:, None]  # (B, C)
        losses = F.cross_entropy(logits, self._targets(questions, logits.device), reduction="none")
        return letter_logprobs.masked_fill(absent, float("-inf")), losses


class MixedScorer(Scorer):
    """Scores items of every format: multiple-choice questions by the named scoring, free-form items by completion.

    A run's sets may differ in format (free-form items to inject, multiple-choice questions to keep), and a
    batch may hold both; each item goes to its format's scorer and the results come back in input order.
    ``name`` is the multiple-choice scoring's, as every record names it.
    """

    def __init__(self, choices: Scorer, completions: CompletionScorer) -> None:
        super().__init__(choices.tokenizer)
        self.choices, self.completions = choices, completions
        self.name = choices.name

    def scorer_of(self, item: Item) -> Scorer:
        """The scorer of the item's format."""
        return self.completions if isinstance(item, Completion) else self.choices

    def sequence_length(self, question: Item) -> int:
        return self.scorer_of(question).sequence_length(question)

    def batch_key(self, question: Item) -> int:
        return self.scorer_of(question).batch_key(question)

    def check_fits(self, model: Any, questions: Sequence[Item]) -> None:
        for scorer, _, items in self._parts(questions):
            scorer.check_fits(model, items)

    def loss(self, model: Any, questions: Sequence[Item]) -> torch.Tensor:
        parts = self._parts(questions)
        losses = torch.cat([scorer.loss(model, items) for scorer, _, items in parts])
        order = torch.tensor([index for _, indices, _ in parts for index in indices], device=losses.device)
        return losses[order.argsort()]  # (B,) back in input order

    def choice_table(self, model: Any, questions: Sequence[Item]) -> tuple[torch.Tensor, torch.Tensor]:
        free = [item for item in questions if isinstance(item, Completion)]  # which have no choices: refused
        return (self.completions if free else self.choices).choice_table(model, free or questions)

    @torch.no_grad()
    def outcomes(self, model: Any, questions: Sequence[Item]) -> list[Outcome]:
        results: dict[int, Outcome] = {}
        for scorer, indices, items in self._parts(questions):
            results.update(zip(indices, scorer.outcomes(model, items), strict=True))
        return [results[index] for index in range(len(questions))]

    def _parts(self, questions: Sequence[Item]) -> list[tuple[Scorer, list[int], list[Item]]]:
        """Each format's scorer with its items' positions and the items (multiple choice first; none if empty)."""
        parts = []
        for scorer in (self.choices, self.completions):
            indices = [index for index, item in enumerate(questions) if self.scorer_of(item) is scorer]
            if indices:
                parts.append((scorer, indices, [questions[index] for index in indices]))
        return parts


def make_scorer(
    scoring: str, tokenizer: Any, *, loglik_path: str = "shared", loss_on: str = DEFAULT_LOSS_ON
) -> MixedScorer:
    """The scorer of items of any format: multiple choice by ``scoring`` (``letter``, ``loglik`` or ``loglik-norm``),
    free-form items by their completion, with the loss on ``loss_on`` (``completion`` or ``all``).

    ``loglik_path`` (``shared`` or ``per-choice``) picks how loglik scorings run the choices; see
    :class:`LoglikScorer`.
    """
    return MixedScorer(choice_scorer(scoring, tokenizer, loglik_path=loglik_path), CompletionScorer(tokenizer, loss_on))


def choice_scorer(scoring: str, tokenizer: Any, *, loglik_path: str = "shared") -> Scorer:
    """The multiple-choice scorer for a scoring name (``letter``, ``loglik`` or ``loglik-norm``)."""
    if scoring == "letter":
        return LetterScorer(tokenizer)
    if scoring in ("loglik", "loglik-norm"):
        return LoglikScorer(tokenizer, normalize=scoring == "loglik-norm", path=loglik_path)
    check_scoring_name(scoring)
    raise AssertionError(scoring)  # every name check_scoring_name accepts has a scorer above


def check_scoring_name(scoring: object, source: str = "--scoring") -> None:
    """Refuse a scoring name that is none of :data:`SCORINGS`, saying where it came from.

    ``source`` is the option that gave it (``--scoring``, the default) or, for a name read from a file (a
    mask's metadata, ``split.json``), the file and the field, so a message never blames an option the user
    did not give.
    """
    if scoring in SCORINGS:
        return
    if source == "--scoring":
        raise CplError(f"--scoring {scoring}: choose one of {', '.join(SCORINGS)}")
    shown = repr(scoring)[:60]
    raise CplError(f"{source} is {shown}, none of {', '.join(SCORINGS)} (pass --scoring to choose one)")


@torch.no_grad()
def score_questions(
    model: Any,
    scorer: Scorer,
    questions: Sequence[Question],
    *,
    batch_size: int = 16,
    description: str = "scoring",
    show_progress: bool = True,
) -> Scores:
    """Predict every question's answer, its loss, the correct choice's score and margin, batched, in input order.

    Questions are batched in order of :meth:`Scorer.batch_key` (their length), so a batch pads little.
    """
    order = sorted(range(len(questions)), key=lambda index: scorer.batch_key(questions[index]))
    results: dict[int, Outcome] = {}  # input index -> one question's results
    with progress_bar(description, len(questions), show_progress) as advance:
        for indices in batches(order, batch_size):
            batch = [questions[index] for index in indices]
            rows = scorer.outcomes(model, batch)
            for index, row in zip(indices, rows, strict=True):
                results[index] = row
            advance(len(batch))
    in_order = [results[index] for index in range(len(questions))]
    return Scores(*(list(column) for column in zip(*in_order))) if in_order else Scores([], [], [], [], [])


__all__ = [
    "SCORINGS",
    "LetterScorer",
    "LoglikScorer",
    "MixedScorer",
    "Scorer",
    "Scores",
    "batches",
    "check_scoring_name",
    "context_length",
    "make_scorer",
    "pad_left",
    "score_questions",
]

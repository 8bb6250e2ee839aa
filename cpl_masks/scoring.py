"""How a model answers a multiple-choice question, and the answer loss that training descends.

Two scorings, picked by name:

* ``letter`` (the CPL paper's): the question and lettered options go through the chat template,
  the prediction is the argmax over the choice letters' logits at the last position, and the
  loss is the cross-entropy of the answer letter there (over the whole vocabulary).
* ``loglik`` / ``loglik-norm`` (lm-eval style, for base models): each choice's text is scored as a
  continuation of ``Question: ...\\nAnswer:``; the prediction maximises the summed (``loglik``) or
  per-token mean (``loglik-norm``) log-probability; the loss is the mean cross-entropy over the
  correct choice's tokens.

Batches are padded on the left with explicit position ids, so a question scores the same alone or
in a batch. :meth:`Scorer.check_fits` refuses, before any forward pass, a question whose scored
sequence is longer than the model's context.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cpl_masks.data import LETTERS, Question
from cpl_masks.errors import CplError
from cpl_masks.progress import progress_bar

SCORINGS = ("letter", "loglik", "loglik-norm")


@dataclass
class Scores:
    """Per-question results of scoring a question set, in input order.

    ``logprobs`` is the scoring's score of the correct choice (``letter``: log-probability of its
    letter; ``loglik``: summed log-probability of its text; ``loglik-norm``: per-token mean) and
    ``margins`` its lead over the best wrong choice in the same units (negative when wrong). Both
    move continuously, so they show forgetting long before an answer flips.
    """

    predictions: list[int]
    correct: list[bool]
    losses: list[float]
    logprobs: list[float]
    margins: list[float]

    @property
    def accuracy(self) -> float:
        """Share of questions answered correctly."""
        return sum(self.correct) / len(self.correct) if self.correct else 0.0


def pad_left(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Stack token lists into a left-padded batch with matching attention mask and position ids."""
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (B, T)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, width - len(sequence) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) 0 at the first real token
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    return {key: value.to(device) for key, value in batch.items()}


def context_length(model: Any) -> int | None:
    """The longest sequence the model was built for (its config's ``max_position_embeddings``), or None if unknown.

    Multimodal configs keep it in their text config, which ``get_text_config`` returns.
    """
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text_config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


class Scorer(abc.ABC):
    """Turns questions into model inputs; computes predictions and the differentiable answer loss."""

    name: str

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @abc.abstractmethod
    def sequence_length(self, question: Question) -> int:
        """Tokens in the longest sequence that scoring or training on the question feeds the model."""

    def check_fits(self, model: Any, questions: Sequence[Question]) -> None:
        """Refuse any question longer than the model's context, before the expensive forward passes.

        Without this, an over-long question runs for minutes and then fails allocating memory, or is
        silently scored past the positions the model was trained on. Does nothing when the model's
        config states no context length. The token ids are cached, so scoring does not tokenize again.

        Raises:
            CplError: naming the first such question's file and row, its length and the context length.
        """
        limit = context_length(model)
        if limit is None:
            return
        for question in questions:
            tokens = self.sequence_length(question)
            if tokens > limit:
                raise CplError(
                    f"{question.where}: question is {tokens} tokens, longer than the model's context ({limit})"
                )

    @abc.abstractmethod
    def loss(self, model: Any, questions: Sequence[Question]) -> torch.Tensor:
        """Per-question answer loss, shape (B,), with gradients flowing to the model."""

    @abc.abstractmethod
    def choice_scores(self, model: Any, questions: Sequence[Question]) -> tuple[torch.Tensor, torch.Tensor]:
        """Score of every choice (B, C), -inf past a question's last choice, and answer loss (B,); no gradients.

        The prediction is the highest-scoring choice.
        """

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _bos(self) -> list[int]:
        """The BOS token that starts a plain (non-chat) prompt, where the tokenizer has one."""
        bos = self.tokenizer.bos_token_id
        return [] if bos is None else [bos]


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

    @torch.no_grad()
    def choice_scores(self, model: Any, questions: Sequence[Question]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._last_logits(model, questions)  # (B, V)
        width = max(len(q.choices) for q in questions)
        letter_logprobs = logits.log_softmax(-1)[:, self.letter_ids[:width]]  # (B, C)
        counts = torch.tensor([len(q.choices) for q in questions], device=logits.device)
        absent = torch.arange(width, device=logits.device)[None, :] >= counts[:, None]  # (B, C)
        losses = F.cross_entropy(logits, self._targets(questions, logits.device), reduction="none")
        return letter_logprobs.masked_fill(absent, float("-inf")), losses


class LoglikScorer(Scorer):
    """lm-eval style scoring: each choice's text scored as a continuation of the question."""

    def __init__(self, tokenizer: Any, normalize: bool) -> None:
        super().__init__(tokenizer)
        self.normalize = normalize
        self.name = "loglik-norm" if normalize else "loglik"
        self._row_ids = functools.lru_cache(maxsize=None)(self._build_row_ids)

    @staticmethod
    def context_text(question: Question) -> str:
        """The text each choice continues."""
        body = question.question if question.preformatted else f"Question: {question.question}"
        return f"{body}\nAnswer:"

    def _build_row_ids(self, question: Question, choice: int) -> tuple[tuple[int, ...], int]:
        context = self.context_text(question)
        context_ids = self._bos() + self._encode(context)
        full_ids = self._bos() + self._encode(f"{context} {question.choices[choice]}")
        continuation = len(full_ids) - len(context_ids)
        if continuation < 1 or full_ids[: len(context_ids)] != context_ids:
            continuation = len(self._encode(f" {question.choices[choice]}"))
        return tuple(full_ids), continuation

    def sequence_length(self, question: Question) -> int:
        """The context followed by the question's longest choice."""
        return max(len(self._row_ids(question, choice)[0]) for choice in range(len(question.choices)))

    def _token_nll(self, model: Any, rows: list[tuple[tuple[int, ...], int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed negative log-likelihood (R,) of each row's continuation, and its token count (R,)."""
        batch = pad_left([ids for ids, _ in rows], self.tokenizer.pad_token_id, model.device)
        keep = max(count for _, count in rows) + 1
        logits = model(**batch, logits_to_keep=keep, use_cache=False).logits[:, :-1, :].float()  # (R, keep-1, V)
        targets = torch.full(logits.shape[:2], -100, dtype=torch.long, device=logits.device)  # (R, keep-1)
        for row, (ids, count) in enumerate(rows):
            targets[row, keep - 1 - count :] = torch.tensor(ids[-count:], device=logits.device)
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (R, keep-1), 0 where ignored
        counts = torch.tensor([count for _, count in rows], device=logits.device, dtype=nll.dtype)
        return nll.sum(-1), counts

    def loss(self, model: Any, questions: Sequence[Question]) -> torch.Tensor:
        total, counts = self._token_nll(model, [self._row_ids(q, q.answer) for q in questions])
        return total / counts

    @torch.no_grad()
    def choice_scores(self, model: Any, questions: Sequence[Question]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self._row_ids(q, c) for q in questions for c in range(len(q.choices))]
        total, counts = self._token_nll(model, rows)  # (R,) each
        scores = -(total / counts if self.normalize else total)  # (R,)
        table = torch.full((len(questions), max(len(q.choices) for q in questions)), float("-inf"))  # (B, C)
        losses, start = [], 0
        for row, q in enumerate(questions):
            table[row, : len(q.choices)] = scores[start : start + len(q.choices)].cpu()
            losses.append(total[start + q.answer] / counts[start + q.answer])
            start += len(q.choices)
        return table, torch.stack(losses)


def make_scorer(scoring: str, tokenizer: Any) -> Scorer:
    """The scorer for a scoring name (``letter``, ``loglik`` or ``loglik-norm``)."""
    if scoring == "letter":
        return LetterScorer(tokenizer)
    if scoring in ("loglik", "loglik-norm"):
        return LoglikScorer(tokenizer, normalize=scoring == "loglik-norm")
    raise CplError(f"--scoring {scoring}: choose one of {', '.join(SCORINGS)}")


def batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """Consecutive slices of at most ``size`` items."""
    if size < 1:
        raise CplError(f"--batch-size {size}: must be at least 1")
    return [items[start : start + size] for start in range(0, len(items), size)]


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
    """Predict every question's answer, its loss, the correct choice's score and margin, batched, in input order."""
    scores = Scores(predictions=[], correct=[], losses=[], logprobs=[], margins=[])
    with progress_bar(description, len(questions), show_progress) as advance:
        for batch in batches(questions, batch_size):
            table, loss = scorer.choice_scores(model, batch)  # (B, C), (B,)
            table = table.float().cpu()
            answers = torch.tensor([q.answer for q in batch])  # (B,)
            right = table.gather(1, answers[:, None]).squeeze(1)  # (B,) score of the correct choice
            best_wrong = table.scatter(1, answers[:, None], float("-inf")).max(-1).values  # (B,)
            predictions = table.argmax(-1)  # (B,)
            scores.predictions += predictions.tolist()
            scores.correct += (predictions == answers).tolist()
            scores.losses += loss.tolist()
            scores.logprobs += right.tolist()
            scores.margins += (right - best_wrong).tolist()
            advance(len(batch))
    return scores

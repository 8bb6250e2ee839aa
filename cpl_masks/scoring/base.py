"""The scorer's shape and what every scorer shares: the per-question :class:`Scores`, the
:class:`Scorer` base, left padding with explicit positions, the model's context length and config.

The scorings themselves live in :mod:`cpl_masks.scoring.scorers` (``letter``) and :mod:`cpl_masks.scoring.loglik`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cpl_masks.data.questions import Question
from cpl_masks.errors import CplError

SCORINGS = ("letter", "loglik", "loglik-norm")
DEFAULT_SCORING = "letter"  # the paper's: a chat model answers with the choice's letter
SCORINGS_HELP = "letter (chat models, the paper's), loglik or loglik-norm (base models)"
OBJECTIVES = ("answer", "choices")  # the per-question losses a gradient can be taken of (Scorer.objective)
OBJECTIVE_HELP = (
    "the loss g_M is the gradient of: answer (the correct choice's own loss, the paper's) or choices "
    "(cross-entropy over the choices: it protects the margin)"
)


Outcome = tuple[int, bool, float, float, float]  # one item's prediction, correct, loss, logprob, margin (Scores)


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


def check_objective(name: str, option: str = "--objective") -> str:
    """Refuse an objective that is not one of :data:`OBJECTIVES`, naming the option."""
    if name not in OBJECTIVES:
        raise CplError(f"{option} {str(name)[:40]}: choose one of {', '.join(OBJECTIVES)}")
    return name


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
    too_long = "question is {tokens} tokens"  # how check_fits names an item's length

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @abc.abstractmethod
    def sequence_length(self, question: Question) -> int:
        """Tokens in the longest sequence that scoring or training on the question feeds the model."""

    def batch_key(self, question: Question) -> int:
        """Tokens the question puts in a scoring batch; :func:`score_questions` batches similar keys together."""
        return self.sequence_length(question)

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
                length = self.too_long.format(tokens=tokens)
                raise CplError(f"{question.where}: {length}, longer than the model's context ({limit})")

    @abc.abstractmethod
    def loss(self, model: Any, questions: Sequence[Question]) -> torch.Tensor:
        """Per-question answer loss, shape (B,), with gradients flowing to the model."""

    @abc.abstractmethod
    def choice_table(self, model: Any, questions: Sequence[Question]) -> tuple[torch.Tensor, torch.Tensor]:
        """Score of every choice (B, C), -inf past a question's last choice, and answer loss (B,), with gradients.

        The prediction is the highest-scoring choice.
        """

    @torch.no_grad()
    def outcomes(self, model: Any, questions: Sequence[Question]) -> list[Outcome]:
        """Per question: the predicted choice, whether it is right, the answer loss, the correct choice's score and
        its margin over the best wrong choice (one row of :class:`Scores`)."""
        table, loss = self.choice_scores(model, questions)  # (B, C), (B,)
        table = table.float().cpu()
        answers = torch.tensor([q.answer for q in questions])  # (B,)
        right = table.gather(1, answers[:, None]).squeeze(1)  # (B,) score of the correct choice
        best_wrong = table.scatter(1, answers[:, None], float("-inf")).max(-1).values  # (B,)
        predictions = table.argmax(-1)  # (B,)
        columns = (predictions, predictions == answers, loss, right, right - best_wrong)
        return list(zip(*(column.tolist() for column in columns)))

    @torch.no_grad()
    def choice_scores(self, model: Any, questions: Sequence[Question]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`choice_table` without gradients: what evaluation reads."""
        return self.choice_table(model, questions)

    def choice_loss(self, model: Any, questions: Sequence[Question]) -> torch.Tensor:
        """Per-question cross-entropy over the choices' scores, shape (B,), with gradients.

        The loss of the prediction itself: it falls only where the correct choice gains on the others
        (its margin), whereas :meth:`loss` falls whenever the correct choice's own likelihood rises,
        as fine-tuning on any answers makes every short answer likelier.
        """
        table, _ = self.choice_table(model, questions)  # (B, C)
        answers = torch.tensor([question.answer for question in questions], device=table.device)  # (B,)
        return F.cross_entropy(table, answers, reduction="none")

    def objective(self, name: str) -> Callable[[Any, Sequence[Question]], torch.Tensor]:
        """The per-question loss an objective names: ``answer`` (:meth:`loss`) or ``choices`` (:meth:`choice_loss`)."""
        check_objective(name)
        return self.loss if name == "answer" else self.choice_loss

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _bos(self) -> list[int]:
        """The BOS token that starts a plain (non-chat) prompt, where the tokenizer has one."""
        bos = self.tokenizer.bos_token_id
        return [] if bos is None else [bos]


def text_config(model: Any) -> Any:
    """The model's text config (a multimodal config's text part), through a DDP wrapper."""
    config = model_config(model)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_config(model: Any) -> Any:
    """The model's config, looking through a ``DistributedDataParallel`` wrapper; None if it has none."""
    return getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)


def parameter_dtype(model: Any) -> torch.dtype:
    """The dtype the model's weights are stored in."""
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(model.parameters()).dtype


def batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """Consecutive slices of at most ``size`` items."""
    if size < 1:
        raise CplError(f"--batch-size {size}: must be at least 1")
    return [items[start : start + size] for start in range(0, len(items), size)]

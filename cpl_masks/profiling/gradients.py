"""The answer-loss gradients over a question set, as profiling and the g_M-steered methods need them.

:func:`mean_gradients` accumulates the mean gradient in batches: each batch's loss is the sum of
its per-question losses divided by the set size, so the accumulated gradients are exactly the mean.
A post-accumulate hook moves every parameter's gradient into a float32 buffer as soon as backward
produces it (whatever the model's dtype). :func:`question_gradients` yields one question's gradient
at a time, from which :class:`GradientSums` gives the mean and its standard error at any point
(:func:`gradient_sums`: what the confidence rules need). Under several processes each rank takes
its share of the questions and the sums are all-reduced.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from cpl_masks.data.questions import Question
from cpl_masks.errors import CplError
from cpl_masks.models import activation_checkpointing
from cpl_masks.scoring.scorers import Scorer, batches
from cpl_masks.utils import distributed, sharding


def mean_gradients(
    model: torch.nn.Module,
    scorer: Scorer,
    questions: Sequence[Question],
    *,
    batch_size: int = 16,
    checkpointing: bool = True,
    advance: Callable[[int], None] = lambda _n: None,
    objective: str = "answer",
) -> dict[str, torch.Tensor]:
    """Mean gradient of the answer loss over ``questions``, one float32 tensor per named parameter.

    ``objective`` names the per-question loss (:meth:`~cpl_masks.scoring.base.Scorer.objective`): ``answer``,
    the correct choice's own loss (the paper's), or ``choices``, the cross-entropy over the choices.

    With ``checkpointing`` each decoder layer's activations are recomputed in backward, so a batch
    costs about one layer's activations instead of all of them; the gradients are the same. Under
    several processes (:mod:`cpl_masks.utils.distributed`) each rank takes its share of the questions,
    divides by the global count and the float32 sums are all-reduced, so every rank returns the
    single-process mean (up to the order of float additions); every rank must call it. On a model
    sharded with FSDP2 the gradients come reduce-scattered, and each returned tensor is a DTensor
    holding this rank's shard.
    """
    per_question = scorer.objective(objective)
    parameters = dict(model.named_parameters())  # deduplicates tied weights
    buffers: dict[str, torch.Tensor] = {}
    sharded = any(sharding.is_dtensor(parameter) for parameter in parameters.values())
    with _gradients_into(parameters, buffers), activation_checkpointing(model, checkpointing):
        for batch, weight in _rank_batches(questions, batch_size, equal_counts=sharded):
            losses = per_question(model, batch)  # (B,) per-question loss
            scale = weight * (distributed.world_size() if sharded else 1)  # FSDP2 averages over the ranks
            (losses.sum() * scale / len(questions)).backward()  # divided by the global count
            advance(len(batch) * distributed.world_size() if weight else 0)
    ordered = {name: buffers.pop(name, None) for name in parameters}  # model order
    for name, parameter in parameters.items():
        if ordered[name] is None:  # the loss does not reach this parameter
            ordered[name] = torch.zeros_like(parameter, dtype=torch.float32)  # a DTensor under FSDP2
        if not sharded:
            distributed.all_reduce_sum(ordered[name])  # float32 sum of the ranks' partial means: the mean
        if not _all_finite(ordered[name]):
            raise CplError(f"profile: the gradient of {name} is not finite (loss overflow? try --dtype float32)")
    return ordered


@dataclass
class GradientMoments:
    """Per entry, the mean answer-loss gradient over a question set and its standard error."""

    mean: dict[str, torch.Tensor]  # name -> float32 (param shape)
    standard_error: dict[str, torch.Tensor]  # name -> float32: sample std of the per-question gradients / sqrt(n)


class GradientSums:
    """Running sums of per-question gradients and of their squares: moments of any prefix of a pass."""

    def __init__(self, model: torch.nn.Module) -> None:
        parameters = dict(model.named_parameters())
        self.count = 0
        self.total = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in parameters.items()}
        self.squares = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in parameters.items()}

    def add(self, gradient: dict[str, torch.Tensor]) -> None:
        """Add one question's gradient (name -> tensor; a parameter it does not reach may be absent)."""
        self.count += 1
        for name, value in gradient.items():
            self.total[name] += value
            self.squares[name].addcmul_(value, value)

    def moments(self) -> GradientMoments:
        """Mean and standard error over every rank's questions so far (all-reduced; every rank must call it)."""
        by_tensor = list(self.moments_by_tensor())
        return GradientMoments({name: mean for name, mean, _ in by_tensor}, {name: se for name, _, se in by_tensor})

    def moments_by_tensor(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """Each tensor's (name, mean, standard error) so far, one at a time, the sums kept: a prefix's moments
        at the cost of one tensor's copy instead of the whole model's. Every rank must call it."""
        return self._by_tensor(keep_sums=True)

    def drain(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """Each tensor's (name, mean, standard error) in turn, freeing its sums as it goes: the peak stays at
        the sums, without a second copy of the moments. The sums are spent afterwards. Every rank must call it."""
        return self._by_tensor(keep_sums=False)

    def _by_tensor(self, keep_sums: bool) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        count = self._count()
        for name in list(self.total):
            if keep_sums:  # _mean_and_error reuses the squares in place: work on copies
                total, squares = self.total[name].clone(), self.squares[name].clone()
            else:
                total, squares = self.total.pop(name), self.squares.pop(name)
            total, squares = distributed.all_reduce_sum(total), distributed.all_reduce_sum(squares)
            yield name, *_mean_and_error(total, squares, count)

    def _count(self) -> float:
        """The questions added over every rank (at least 2, for a standard error)."""
        count = distributed.all_reduce_sum(torch.tensor([float(self.count)])).item()
        if count < 2:
            raise CplError(f"--confidence needs at least 2 questions per set for a standard error, got {count:.0f}")
        return count


def _mean_and_error(total: torch.Tensor, squares: torch.Tensor, count: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error of the mean from a sum and a sum of squares (``squares`` is reused in place)."""
    mean = total / count
    variance = squares.sub_(count * mean.square()).clamp_(min=0).div_(count - 1)
    return mean, variance.div_(count).sqrt_()


def question_gradients(
    model: torch.nn.Module,
    scorer: Scorer,
    questions: Sequence[Question],
    *,
    checkpointing: bool = True,
    advance: Callable[[int], None] = lambda _n: None,
    objective: str = "answer",
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's share of ``questions``, one float32 gradient (name -> tensor) per question, each valid
    until the next is asked for."""
    per_question = scorer.objective(objective)
    parameters = dict(model.named_parameters())
    buffers: dict[str, torch.Tensor] = {}
    with _gradients_into(parameters, buffers), activation_checkpointing(model, checkpointing):
        for batch, _weight in _rank_batches(questions, 1, equal_counts=False):
            per_question(model, batch).sum().backward()
            yield buffers
            buffers.clear()
            advance(distributed.world_size())


def gradient_sums(
    model: torch.nn.Module,
    scorer: Scorer,
    questions: Sequence[Question],
    *,
    checkpointing: bool = True,
    advance: Callable[[int], None] = lambda _n: None,
    objective: str = "answer",
) -> GradientSums:
    """The sums of the per-question gradients over ``questions`` and of their squares, one backward pass per
    question: what the confidence rules need to tell a conflict, or a sign of g_M, from noise.

    ``objective`` as in :func:`mean_gradients`. It costs a pass per question (batch 1) and two
    float32 sums per entry; :meth:`GradientSums.moments` or :meth:`GradientSums.drain` gives the mean
    and its standard error. Under several processes each rank takes its share and the sums are
    all-reduced; a model sharded with FSDP2 is refused (:func:`cpl_masks.profiling.freeze_mask.check_cut_runs`).
    """
    sums = GradientSums(model)
    per_question = question_gradients(
        model, scorer, questions, checkpointing=checkpointing, advance=advance, objective=objective
    )
    for gradient in per_question:
        sums.add(gradient)
    return sums


def _rank_batches(
    questions: Sequence[Question], batch_size: int, *, equal_counts: bool
) -> Iterator[tuple[Sequence[Question], float]]:
    """This rank's batches of ``questions`` with their weight (1), sorted by length so batches pad less.

    With ``equal_counts`` (an FSDP2 model, whose every backward is a collective) a rank with fewer
    batches than the others ends with batches of one question at weight 0.
    """
    local = distributed.shard(sorted(questions, key=lambda item: item.text_length))
    own = batches(local, batch_size) if local else []
    for batch in own:
        yield batch, 1.0
    if equal_counts:
        for _ in range(math.ceil(distributed.shard_size(len(questions)) / batch_size) - len(own)):
            yield questions[:1], 0.0


def _all_finite(gradient: torch.Tensor) -> bool:
    """Whether every entry is finite; for a DTensor, on every rank (the answer is the same everywhere)."""
    if not sharding.is_dtensor(gradient):
        return bool(torch.isfinite(gradient).all())
    bad = torch.tensor([float(not torch.isfinite(sharding.local(gradient)).all())], device=gradient.device)
    return not distributed.all_reduce_sum(bad).item()


@contextlib.contextmanager
def _gradients_into(parameters: dict[str, torch.nn.Parameter], buffers: dict[str, torch.Tensor]) -> Iterator[None]:
    """While active, every backward adds each parameter's gradient to ``buffers[name]`` (float32)."""
    flags = {name: parameter.requires_grad for name, parameter in parameters.items()}
    handles = []
    for name, parameter in parameters.items():
        parameter.grad = None
        parameter.requires_grad_(True)
        handles.append(parameter.register_post_accumulate_grad_hook(_accumulator(name, buffers)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for name, parameter in parameters.items():
            parameter.grad = None
            parameter.requires_grad_(flags[name])


def _accumulator(name: str, buffers: dict[str, torch.Tensor]) -> Callable[[torch.nn.Parameter], None]:
    def hook(parameter: torch.nn.Parameter) -> None:
        grad = parameter.grad
        if name in buffers:
            buffers[name] += grad
        else:
            buffers[name] = grad if grad.dtype == torch.float32 else grad.float()
        parameter.grad = None

    return hook

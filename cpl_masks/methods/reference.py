"""``g_M`` at the current weights, kept fresh for the methods that steer by it: the whole gradient
(A-GEM projects onto it) or only its signs (the dynamic rule needs no more, measured as its
:class:`~cpl_masks.profiling.retain.SignMeasure` says)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import torch

from cpl_masks.data.questions import Question
from cpl_masks.masks.signs import PackedSigns
from cpl_masks.methods.base import MethodContext, RefreshOptions
from cpl_masks.profiling.gradients import mean_gradients
from cpl_masks.profiling.retain import SignMeasure, measure_signs

Kept = TypeVar("Kept")


class MasteredReference(Generic[Kept]):
    """What a method keeps of ``g_M`` over M, recomputed at the start of every epoch and every
    ``refresh_every`` steps; between refreshes it is fixed.

    With ``refresh_sample`` N each refresh takes N questions of M drawn afresh, by (seed, epoch,
    step), so a resumed run draws the same ones: a refresh then costs N/|M| of a pass over M.
    ``measure`` computes what is held until the next refresh from the model and the questions drawn.
    """

    def __init__(
        self,
        context: MethodContext,
        schedule: RefreshOptions,
        measure: Callable[[torch.nn.Module, Sequence[Question]], Kept],
    ) -> None:
        self.context = context
        self.schedule = schedule
        self.measure = measure
        self.kept: Kept | None = None

    def refresh_if_due(self, model: torch.nn.Module, epoch: int, step_in_epoch: int) -> bool:
        """Recompute ``g_M`` when an epoch starts or ``refresh_every`` steps have passed; True when it did."""
        if not self.schedule.due(epoch, step_in_epoch):
            return False
        self.kept = None  # free the old one before building the new one
        self.kept = self.measure(model, self.sample(epoch, step_in_epoch))
        return True

    def sample(self, epoch: int, step_in_epoch: int) -> Sequence[Question]:
        """The questions of M the refresh at (epoch, step) computes g_M over: all, or ``refresh_sample`` drawn."""
        mastered, size = self.context.mastered, self.schedule.refresh_sample
        if size is None or size >= len(mastered):
            return mastered
        draw = random.Random(f"cpl-masks:refresh:{self.context.seed}:{epoch}:{step_in_epoch}")
        return [mastered[index] for index in sorted(draw.sample(range(len(mastered)), size))]

    def hold(self, kept: Kept) -> None:
        """Hold ``kept`` until the next refresh: what a refresh at these weights would keep, known already."""
        self.kept = kept

    @property
    def value(self) -> Kept:
        """What was kept at the last refresh."""
        if self.kept is None:
            raise RuntimeError("g_M is read before its first refresh")
        return self.kept


def mastered_gradient(context: MethodContext, schedule: RefreshOptions) -> MasteredReference[dict[str, torch.Tensor]]:
    """``g_M`` itself: float32, one tensor per named parameter."""
    objective = schedule.objective or "answer"

    def measure(model: torch.nn.Module, questions: Sequence[Question]) -> dict[str, torch.Tensor]:
        return mean_gradients(model, context.scorer, questions, batch_size=context.batch_size, objective=objective)

    return MasteredReference(context, schedule, measure)


def mastered_signs(
    context: MethodContext, schedule: RefreshOptions, how: SignMeasure
) -> MasteredReference[PackedSigns]:
    """Only the signs of ``g_M``, two bits per entry, measured as ``how`` says."""

    def measure(model: torch.nn.Module, questions: Sequence[Question]) -> PackedSigns:
        return measure_signs(model, context.scorer, questions, how, batch_size=context.batch_size)

    return MasteredReference(context, schedule, measure)

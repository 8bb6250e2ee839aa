"""``g_M`` at the current weights, kept fresh for the methods that steer by it: the whole gradient
(A-GEM projects onto it) or only its signs (the dynamic rule needs no more)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import torch

from cpl_masks.data import Question
from cpl_masks.gradients import mean_gradients
from cpl_masks.methods.base import MethodContext, RefreshOptions
from cpl_masks.signs import PackedSigns

Kept = TypeVar("Kept")


class MasteredReference(Generic[Kept]):
    """What a method keeps of ``g_M`` over M, recomputed at the start of every epoch and every
    ``refresh_every`` steps; between refreshes it is fixed.

    With ``refresh_sample`` N each refresh takes N questions of M drawn afresh, by (seed, epoch,
    step), so a resumed run draws the same ones: a refresh then costs N/|M| of a pass over M.
    ``keep`` turns the float32 gradient (name -> tensor, which it may empty as it goes) into what is
    held until the next refresh.
    """

    def __init__(
        self, context: MethodContext, schedule: RefreshOptions, keep: Callable[[dict[str, torch.Tensor]], Kept]
    ) -> None:
        self.context = context
        self.schedule = schedule
        self.keep = keep
        self.kept: Kept | None = None

    def refresh_if_due(self, model: torch.nn.Module, epoch: int, step_in_epoch: int) -> bool:
        """Recompute ``g_M`` when an epoch starts or ``refresh_every`` steps have passed; True when it did."""
        every = self.schedule.refresh_every
        if not (step_in_epoch == 0 or (every is not None and step_in_epoch % every == 0)):
            return False
        self.kept = None  # free the old one before building the new one
        context = self.context
        questions = self.sample(epoch, step_in_epoch)
        objective = self.schedule.objective or "answer"
        gradient = mean_gradients(model, context.scorer, questions, batch_size=context.batch_size, objective=objective)
        self.kept = self.keep(gradient)
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
    return MasteredReference(context, schedule, lambda gradient: gradient)


def mastered_signs(context: MethodContext, schedule: RefreshOptions) -> MasteredReference[PackedSigns]:
    """Only the signs of ``g_M``, two bits per entry, each float tensor freed once packed."""
    return MasteredReference(context, schedule, PackedSigns.take)

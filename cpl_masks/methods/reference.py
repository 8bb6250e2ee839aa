"""``g_M`` at the current weights, kept fresh for the methods that steer by it: the whole gradient
(A-GEM projects onto it) or only its signs (the dynamic rule needs no more)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import torch

from cpl_masks.methods.base import MethodContext
from cpl_masks.profile import mean_gradients
from cpl_masks.signs import PackedSigns

Kept = TypeVar("Kept")


class MasteredReference(Generic[Kept]):
    """What a method keeps of ``g_M`` over M, recomputed at the start of every epoch and every
    ``refresh_every`` steps; between refreshes it is fixed.

    ``keep`` turns the float32 gradient (name -> tensor, which it may empty as it goes) into what is
    held until the next refresh.
    """

    def __init__(
        self, context: MethodContext, refresh_every: int | None, keep: Callable[[dict[str, torch.Tensor]], Kept]
    ) -> None:
        self.context = context
        self.refresh_every = refresh_every
        self.keep = keep
        self.kept: Kept | None = None

    def refresh_if_due(self, model: torch.nn.Module, step_in_epoch: int) -> None:
        """Recompute ``g_M`` when an epoch starts or ``refresh_every`` steps have passed."""
        every = self.refresh_every
        if step_in_epoch == 0 or (every is not None and step_in_epoch % every == 0):
            self.kept = None  # free the old one before building the new one
            context = self.context
            gradient = mean_gradients(model, context.scorer, context.mastered, batch_size=context.batch_size)
            self.kept = self.keep(gradient)

    @property
    def value(self) -> Kept:
        """What was kept at the last refresh."""
        if self.kept is None:
            raise RuntimeError("g_M is read before its first refresh")
        return self.kept


def mastered_gradient(context: MethodContext, refresh_every: int | None) -> MasteredReference[dict[str, torch.Tensor]]:
    """``g_M`` itself: float32, one tensor per named parameter."""
    return MasteredReference(context, refresh_every, lambda gradient: gradient)


def mastered_signs(context: MethodContext, refresh_every: int | None) -> MasteredReference[PackedSigns]:
    """Only the signs of ``g_M``, two bits per entry, each float tensor freed once packed."""
    return MasteredReference(context, refresh_every, PackedSigns.take)

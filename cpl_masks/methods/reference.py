"""The mastered-set gradient ``g_M`` at the current weights, kept fresh for methods that steer by it."""

from __future__ import annotations

import torch

from cpl_masks.methods.base import MethodContext
from cpl_masks.profile import mean_gradients


class MasteredGradient:
    """``g_M`` over M, recomputed at the start of every epoch and every ``refresh_every`` steps.

    The dynamic rule and A-GEM both compare each step's gradient with it; between refreshes it is a
    fixed direction.
    """

    def __init__(self, context: MethodContext, refresh_every: int | None) -> None:
        self.context = context
        self.refresh_every = refresh_every
        self.gradient: dict[str, torch.Tensor] = {}  # name -> float32 (param shape) mean gradient over M

    def refresh_if_due(self, model: torch.nn.Module, step_in_epoch: int) -> None:
        """Recompute ``g_M`` when an epoch starts or ``refresh_every`` steps have passed."""
        every = self.refresh_every
        if step_in_epoch == 0 or (every is not None and step_in_epoch % every == 0):
            self.gradient = {}  # free the old g_M before building the new one
            context = self.context
            self.gradient = mean_gradients(model, context.scorer, context.mastered, batch_size=context.batch_size)

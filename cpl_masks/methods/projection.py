"""A-GEM (``agem``): project each step's gradient so it never points against ``g_M``.

Treating all trainable gradients as one vector ``g``, when ``g·g_M < 0`` the step descends
``g − (g·g_M / g_M·g_M)·g_M`` instead, the closest direction that does not raise the mastered-set
loss to first order (Chaudhry et al., 2019). ``g_M`` is kept fresh exactly as the dynamic rule keeps
it: recomputed at every epoch's start and every ``refresh_every`` steps. Unlike the dynamic rule,
which zeroes disagreeing entries one by one, A-GEM changes the whole vector only when the two
directions conflict overall.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cpl_masks.errors import CplError
from cpl_masks.methods.base import Method, MethodContext, RefreshOptions
from cpl_masks.methods.reference import mastered_gradient


def total_dot(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """``Σ a·b`` over all pairs of same-shape tensors, as if each side were one flat vector (float64 sums)."""
    if not pairs:
        return 0.0
    return float(torch.stack([torch.sum(a * b, dtype=torch.float64) for a, b in pairs]).sum())


class AGEM(Method):
    """Averaged gradient episodic memory against the mastered set M."""

    name = "agem"

    def __init__(self, context: MethodContext, options: RefreshOptions | None = None) -> None:
        context.require_mastered(self.name)
        options = options or RefreshOptions()
        self.check_options(options, retain=False)
        self.reference = mastered_gradient(context, options)
        self.steps = 0  # steps seen by this process (a resumed run counts from its resume)
        self.projected_steps = 0  # of those, the steps whose gradient was projected

    @classmethod
    def check_options(cls, options: RefreshOptions, *, retain: bool) -> None:
        """Refuse never refreshing: A-GEM keeps g_M itself, which no file stores for a resumed run."""
        if options.never:
            raise CplError("--refresh-every 0: agem keeps g_M itself, which no file stores to resume from")

    def before_step(self, model: torch.nn.Module, epoch: int, step_in_epoch: int) -> None:
        """Recompute ``g_M`` at the start of each epoch and every ``refresh_every`` steps within it."""
        self.reference.refresh_if_due(model, epoch, step_in_epoch)

    def mask_gradients(self, model: torch.nn.Module) -> None:
        """Project ``g`` onto the half-space ``g·g_M ≥ 0`` when it lies outside; leave it otherwise."""
        pairs = self._pairs(model)
        self.steps += 1
        dot, norm_sq = total_dot(pairs), total_dot([(g_m, g_m) for _, g_m in pairs])
        if norm_sq == 0 or dot >= 0:  # no mastered direction, or no conflict
            return
        coefficient = dot / norm_sq
        for grad, g_m in pairs:
            grad.add_(g_m, alpha=-coefficient)  # in the gradient's own dtype
        self.projected_steps += 1

    def _pairs(self, model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each trainable gradient with its ``g_M`` tensor (float32, same shape)."""
        g_mastered = self.reference.value
        return [
            (parameter.grad, g_mastered[name])
            for name, parameter in model.named_parameters()
            if parameter.grad is not None
        ]

    def describe(self) -> dict[str, Any]:
        """How many steps were projected, out of how many (counted since this process started)."""
        return {"projected_steps": self.projected_steps, "steps": self.steps}

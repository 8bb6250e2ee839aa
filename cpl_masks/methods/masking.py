"""Per-entry methods: plain fine-tuning, a static freeze mask, and the paper's dynamic sign rule.

* :class:`FullFineTuning` (``full``): the baseline, every entry trains.
* :class:`StaticMask` (``mask``, the main path): only collaborative entries change. Tensors with no
  collaborative entry stop requiring gradients; the others keep a bool mask of their frozen
  entries (never a float copy) and their gradients are zeroed there in place. Control masks
  (random, gradient-magnitude) take this same path.
* :class:`DynamicCPL` (``dynamic``, the paper's loop): ``g_M`` is recomputed over the mastered set at
  the start of every epoch (and every K steps with ``refresh_every``) and held as its signs, two bits
  per entry (:class:`~cpl_masks.signs.PackedSigns`); each step's gradient ``g`` keeps only the
  entries where ``g ⊙ g_M ≥ 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cpl_masks.errors import CplError
from cpl_masks.methods.base import Method, MethodContext, RefreshOptions
from cpl_masks.methods.reference import mastered_signs


@dataclass
class NoOptions:
    """A method without options of its own."""


class FullFineTuning(Method):
    """Plain fine-tuning: every parameter entry trains (the baseline)."""

    name = "full"

    def __init__(self, context: MethodContext | None = None, options: NoOptions | None = None) -> None:
        del context, options


class StaticMask(Method):
    """Train only the collaborative entries of a freeze mask; the conflicting ones never change."""

    name = "mask"

    def __init__(self, context: MethodContext, options: NoOptions | None = None) -> None:
        if context.mask is None:
            raise CplError("--mode mask needs --mask MASK")
        self.mask = context.mask
        self.frozen: dict[str, torch.Tensor] = {}  # name -> bool (param shape), True = frozen entry

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Stop gradients of wholly frozen tensors and keep a bool mask for partly frozen ones."""
        self.frozen = {}
        for name, parameter in model.named_parameters():
            collaborative = self.mask.collaborative(name).to(parameter.device)  # bool, param shape
            parameter.requires_grad_(bool(collaborative.any()))
            if parameter.requires_grad and not collaborative.all():
                self.frozen[name] = collaborative.logical_not_()
        return model

    def mask_gradients(self, model: torch.nn.Module) -> None:
        """Zero the gradient of every frozen entry, in place."""
        for name, parameter in model.named_parameters():
            if name in self.frozen and parameter.grad is not None:
                parameter.grad.masked_fill_(self.frozen[name], 0)

    def frozen_entries(self) -> dict[str, torch.Tensor]:
        """Bool masks (True = frozen) of the partly frozen trainable tensors."""
        return self.frozen

    def describe(self) -> dict[str, Any]:
        """The mask's id and collaborative share."""
        return {"mask_id": self.mask.id, "collaborative_share": self.mask.collaborative_share()}


class DynamicCPL(Method):
    """The paper's rule: keep the entries of each step's gradient that agree in sign with ``g_M``."""

    name = "dynamic"

    def __init__(self, context: MethodContext, options: RefreshOptions | None = None) -> None:
        context.require_mastered(self.name)
        self.reference = mastered_signs(context, options or RefreshOptions())

    def before_step(self, model: torch.nn.Module, epoch: int, step_in_epoch: int) -> None:
        """Recompute ``g_M`` at the start of each epoch and every ``refresh_every`` steps within it."""
        self.reference.refresh_if_due(model, epoch, step_in_epoch)

    def mask_gradients(self, model: torch.nn.Module) -> None:
        """Zero, in place, the gradient entries whose sign disagrees with ``g_M`` (``g ⊙ g_M < 0``)."""
        signs = self.reference.value
        for name, parameter in model.named_parameters():
            if parameter.grad is not None:
                parameter.grad.masked_fill_(signs.disagreeing(name, parameter.grad), 0)  # one tensor at a time

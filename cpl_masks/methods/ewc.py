"""EWC (``ewc``): an elastic penalty holding the weights the mastered set depends on near their start.

Before training, ``θ₀`` is a copy of every trainable parameter and ``F`` the diagonal empirical
Fisher information over the mastered set M: the mean over its questions of the squared
per-question gradient of the answer loss (Kirkpatrick et al., 2017). Each step's loss then gains
``λ·Σ F ⊙ (θ − θ₀)²``. Both are taken from the fresh base model, so a resumed run (which prepares
the base model before restoring its weights) anchors to the same ``θ₀`` and ``F``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cpl_masks.data.questions import Question
from cpl_masks.errors import CplError
from cpl_masks.methods.base import Method, MethodContext, option
from cpl_masks.scoring.scorers import Scorer


@dataclass
class EwcOptions:
    """The strength ``λ`` of the elastic penalty (``--ewc-lambda``)."""

    ewc_lambda: float = option(1e4, "strength λ of the Fisher penalty")

    def __post_init__(self) -> None:
        if not (self.ewc_lambda > 0 and math.isfinite(self.ewc_lambda)):
            raise CplError(f"--ewc-lambda {self.ewc_lambda}: must be a positive number")


def diagonal_fisher(model: torch.nn.Module, scorer: Scorer, questions: Sequence[Question]) -> dict[str, torch.Tensor]:
    """Mean over ``questions`` of each trainable entry's squared per-question answer-loss gradient.

    One question per backward pass (a batch would square the sum, not sum the squares); a
    post-accumulate hook squares each gradient into a float32 buffer as soon as it exists and
    frees it, so memory stays at the model, the buffers and one question's activations. Only
    parameters that require gradients are measured (their flags are left as they are) and every
    gradient is cleared afterwards.
    """
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in parameters.items()}
    with _squared_gradients_into(parameters, fisher):
        for question in questions:
            scorer.loss(model, [question]).sum().backward()
    for buffer in fisher.values():
        buffer.div_(len(questions))
    return fisher


@contextlib.contextmanager
def _squared_gradients_into(
    parameters: dict[str, torch.nn.Parameter], buffers: dict[str, torch.Tensor]
) -> Iterator[None]:
    """While active, every backward adds each parameter's squared gradient to ``buffers[name]``."""
    handles = [
        parameter.register_post_accumulate_grad_hook(_square_adder(buffers[name]))
        for name, parameter in parameters.items()
    ]
    for parameter in parameters.values():
        parameter.grad = None
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for parameter in parameters.values():
            parameter.grad = None


def _square_adder(buffer: torch.Tensor) -> Callable[[torch.nn.Parameter], None]:
    def hook(parameter: torch.nn.Parameter) -> None:
        buffer.add_(parameter.grad.float().square())  # (param shape) float32
        parameter.grad = None

    return hook


class EWC(Method):
    """Fine-tuning with an elastic penalty ``λ·Σ F ⊙ (θ − θ₀)²`` anchored on the mastered set."""

    name = "ewc"

    def __init__(self, context: MethodContext, options: EwcOptions | None = None) -> None:
        self.context = context
        context.require_mastered(self.name)
        self.strength = (options or EwcOptions()).ewc_lambda
        self.anchor: dict[str, torch.Tensor] = {}  # name -> θ₀ (param shape, param dtype)
        self.fisher: dict[str, torch.Tensor] = {}  # name -> F (param shape) float32

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Make every parameter trainable, then record ``θ₀`` and the Fisher diagonal ``F`` over M."""
        model = super().prepare(model)
        self.anchor = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        self.fisher = diagonal_fisher(model, self.context.scorer, self.context.mastered)
        return model

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        """``λ·Σ F ⊙ (θ − θ₀)²`` over the trainable parameters, a float32 scalar with gradients."""
        terms = [
            (self.fisher[name] * (parameter.float() - self.anchor[name].float()).square()).sum()
            for name, parameter in model.named_parameters()
            if name in self.fisher
        ]
        return self.strength * torch.stack(terms).sum()

    def describe(self) -> dict[str, Any]:
        """Total and largest Fisher entries: how strongly M pins the weights."""
        total = sum(float(values.sum(dtype=torch.float64)) for values in self.fisher.values())
        largest = max((float(values.max()) for values in self.fisher.values() if values.numel()), default=0.0)
        return {"fisher_sum": total, "fisher_max": largest}

"""The shape every training method has: hooks the one training loop calls at fixed points.

A method never owns a loop. :class:`~cpl_masks.training.loop.Trainer` asks it, in order, to

1. ``prepare`` the model once (freeze tensors, wrap it in an adapter, snapshot reference weights);
2. give each epoch's ``stream`` of training questions (the injection set, shuffled; replay mixes
   mastered questions in);
3. refresh anything it needs ``before_step`` (a mastered-set gradient ``g_M``);
4. add a ``penalty`` to the step's loss (EWC);
5. edit the gradients in ``mask_gradients`` between backward and the optimizer step;
6. report its ``frozen_entries`` so the optimizer never moves them, and ``save`` the result.

Every hook has a do-nothing default, so a method states only what makes it different; plain
fine-tuning is the method that changes nothing.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from cpl_masks.data.questions import Question
from cpl_masks.errors import CplError
from cpl_masks.scoring.base import OBJECTIVE_HELP, check_objective
from cpl_masks.scoring.scorers import Scorer

if TYPE_CHECKING:
    from cpl_masks.masks.format import Mask


@dataclass
class MethodContext:
    """What a method may use besides the model: the scorer, the mastered set M and the mask.

    ``mastered`` is the set a mask was profiled on, never the held-out set: methods that look at
    old knowledge (dynamic, A-GEM, EWC, replay) see only what a mask could have seen.
    """

    scorer: Scorer
    mastered: Sequence[Question]
    mask: Mask | None = None
    inject: Sequence[Question] = ()  # the injection set, for a mask profiled again during training
    batch_size: int = 16  # questions per forward pass for reference gradients
    seed: int = 0

    def require_mastered(self, mode: str) -> Sequence[Question]:
        """The mastered set, refusing an empty one: ``mode`` cannot steer by, replay or anchor on nothing."""
        if not self.mastered:
            raise CplError(f"--method {mode} needs a non-empty mastered set (--mastered)")
        return self.mastered


def option(default: Any, help: str) -> Any:
    """A field of a method's options dataclass: its default and help text, the one place both are written.

    The CLI's ``train`` and ``sweep`` options are generated from these fields (:mod:`cpl_masks.cli.method_options`).
    """
    return field(default=default, metadata={"help": help})


@dataclass
class ScheduleOptions:
    """Options of methods that refresh what they steer by at each epoch's start: also every K steps."""

    refresh_every: int | None = option(
        None,
        "also recompute g_M (random-signs: draw the signs again) every K steps (default: once per epoch; "
        "0: never, what the first step steers by is kept to the end)",
    )

    def __post_init__(self) -> None:
        if self.refresh_every is not None and self.refresh_every < 0:
            raise CplError(f"--refresh-every {self.refresh_every}: must be at least 1 (or 0: never)")

    @property
    def never(self) -> bool:
        """Whether what the first step steers by is kept to the end (``--refresh-every 0``)."""
        return self.refresh_every == 0

    def due(self, epoch: int, step_in_epoch: int) -> bool:
        """Whether a refresh is due before this step: at an epoch's start, and every ``refresh_every`` steps;
        only before the run's first step when it never refreshes."""
        if self.never:
            return (epoch, step_in_epoch) == (1, 0)
        every = self.refresh_every
        return step_in_epoch == 0 or (every is not None and step_in_epoch % every == 0)


@dataclass
class RefreshOptions(ScheduleOptions):
    """Options of methods that steer by ``g_M`` (dynamic, A-GEM): its schedule, and what it is computed over."""

    refresh_sample: int | None = option(
        None, "each refresh computes g_M over N questions of M drawn afresh (default: all of M)"
    )
    objective: str | None = option(None, f"{OBJECTIVE_HELP}; default: a retain set's, else answer")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.refresh_sample is not None and self.refresh_sample < 1:
            raise CplError(f"--refresh-sample {self.refresh_sample}: must be at least 1")
        if self.objective is not None:
            check_objective(self.objective)


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The order examples are visited in during ``epoch`` (1-based): a shuffle fixed by seed and epoch.

    Depending only on (seed, epoch), not on a running generator, it is the same after a resume.
    """
    order = list(range(count))
    random.Random(f"cpl-masks:{seed}:{epoch}").shuffle(order)
    return order


class Method:
    """Base of every training method; each hook's default leaves training as plain fine-tuning."""

    name: ClassVar[str]

    @classmethod
    def check_options(cls, options: Any, *, retain: bool) -> None:
        """Refuse options this method cannot honour (``retain``: a retain set is given) before any model loads."""

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Make the model trainable as the method wants; returns the module to train (maybe a wrapper)."""
        model.requires_grad_(True)
        return model

    def stream(self, inject: Sequence[Question], epoch: int, seed: int) -> list[Question]:
        """The questions of one epoch, in training order."""
        return [inject[index] for index in epoch_order(len(inject), seed, epoch)]

    def before_step(self, model: torch.nn.Module, epoch: int, step_in_epoch: int) -> None:
        """Refresh per-step state before the step's forward pass."""

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        """A term added to the step's loss (with gradients), or None."""
        return None

    def mask_gradients(self, model: torch.nn.Module) -> None:
        """Edit the gradients, in place, between backward and the optimizer step."""

    def frozen_entries(self) -> dict[str, torch.Tensor]:
        """Packed frozen entries (:mod:`cpl_masks.training.frozen`) of partly frozen trainable tensors; the
        optimizer leaves those entries."""
        return {}

    def save(self, model: torch.nn.Module, folder: Path) -> None:
        """Write the trained result into ``folder`` (``save_pretrained``, loadable by plain transformers)."""
        model.save_pretrained(folder)

    def describe(self) -> dict[str, Any]:
        """What to record about the method in ``run.json`` beyond its configuration."""
        return {}

    def made_masks(self) -> list[Mask]:
        """Masks the method made while training (a mask profiled again), kept in the run folder."""
        return []

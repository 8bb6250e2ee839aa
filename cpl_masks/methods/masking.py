"""Per-entry methods: plain fine-tuning, a static freeze mask, and the paper's dynamic sign rule.

* :class:`FullFineTuning` (``full``): the baseline, every entry trains.
* :class:`StaticMask` (``mask``, the main path): only collaborative entries change. Tensors with no
  collaborative entry stop requiring gradients, so no gradient is ever allocated for them; the others
  keep their frozen entries packed, a bit each (:mod:`cpl_masks.training.frozen`), and their gradients
  are zeroed there in place, a chunk of rows at a time. Control masks
  (random, gradient-magnitude) take this same path. With ``reprofile_every`` K the mask follows the
  weights: it is profiled again (its own rule, M and I) at each epoch's start after the first and
  every K steps, every tensor keeping packed frozen entries that each new profile overwrites in place.
* :class:`DynamicCPL` (``dynamic``, the paper's loop): ``g_M`` is recomputed over the mastered set at
  the start of every epoch (and every K steps with ``refresh_every``) and held as its signs, two bits
  per entry (:class:`~cpl_masks.masks.signs.PackedSigns`); each step's gradient ``g`` keeps only the
  entries where ``g ⊙ g_M ≥ 0``.
* :class:`RandomSigns` (``random-signs``): the same rule steered by random signs, its control.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cpl_masks.errors import CplError
from cpl_masks.masks.format import Mask, weights_metadata
from cpl_masks.masks.signs import PackedSigns
from cpl_masks.methods.base import Method, MethodContext, RefreshOptions, ScheduleOptions, option
from cpl_masks.methods.reference import mastered_signs
from cpl_masks.profiling.freeze_mask import reprofile
from cpl_masks.profiling.retain import CONFIDENCE_HELP, UNCERTAIN_HELP, SignMeasure, refreshed_retain, retain_measure
from cpl_masks.profiling.selection import Cut
from cpl_masks.training.frozen import as_rows, frozen_rows, pack_frozen, row_chunks
from cpl_masks.utils import sharding


@dataclass
class NoOptions:
    """A method without options of its own."""


@dataclass
class ReprofileOptions:
    """Options of the static mask: profile it again as the weights move."""

    reprofile_every: int | None = option(
        None,
        "profile the mask again at the current weights every K steps and at each epoch's start after the first "
        "(--optimizer sgd; each mask is kept in the run; default: never)",
    )

    def __post_init__(self) -> None:
        if self.reprofile_every is not None and self.reprofile_every < 1:
            raise CplError(f"--reprofile-every {self.reprofile_every}: must be at least 1")


class FullFineTuning(Method):
    """Plain fine-tuning: every parameter entry trains (the baseline)."""

    name = "full"

    def __init__(self, context: MethodContext | None = None, options: NoOptions | None = None) -> None:
        del context, options


class StaticMask(Method):
    """Train only the collaborative entries of a freeze mask; the conflicting ones never change."""

    name = "mask"

    def __init__(self, context: MethodContext, options: ReprofileOptions | None = None) -> None:
        if context.mask is None:
            raise CplError("--method mask needs --mask MASK")
        context.mask.require_kind("mask", "--mask")
        self.mask = context.mask
        self.context = context
        self.reprofile_every = (options or ReprofileOptions()).reprofile_every
        if self.reprofile_every is not None:
            Cut.from_metadata(self.mask.metadata.get("rule"), f"--reprofile-every: mask {self.mask.id[:12]}")
            if not context.inject or not context.mastered:
                raise CplError("--reprofile-every needs the injection set and a non-empty mastered set (--mastered)")
        self.frozen: dict[str, torch.Tensor] = {}  # name -> packed rows (uint8), a set bit = a frozen entry
        self.profiles: list[Mask] = []  # the masks profiled during training, in order

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Stop gradients of wholly frozen tensors and keep the packed frozen entries of partly frozen ones.

        A mask profiled again may open any tensor, so then every tensor keeps packed frozen entries.
        """
        self.frozen = {}
        every_tensor = self.reprofile_every is not None
        for name, parameter in model.named_parameters():
            collaborative = self.mask.collaborative(name).to(parameter.device)  # bool, param shape
            parameter.requires_grad_(every_tensor or bool(collaborative.any()))
            if parameter.requires_grad and (every_tensor or not collaborative.all()):
                self.frozen[name] = pack_frozen(collaborative.logical_not_())
        return model

    def mask_gradients(self, model: torch.nn.Module) -> None:
        """Zero the gradient of every frozen entry, in place, a chunk of rows at a time."""
        for name, parameter in model.named_parameters():
            if name in self.frozen and parameter.grad is not None:
                grads, packed = as_rows(sharding.local(parameter.grad)), sharding.local(self.frozen[name])
                for start, stop in row_chunks(grads):
                    grads[start:stop].masked_fill_(frozen_rows(packed, grads.shape[1], start, stop), 0)

    def frozen_entries(self) -> dict[str, torch.Tensor]:
        """Packed frozen entries (:mod:`cpl_masks.training.frozen`) of the partly frozen trainable tensors."""
        return self.frozen

    def before_step(self, model: torch.nn.Module, epoch: int, step_in_epoch: int) -> None:
        """With ``reprofile_every`` K: profile the mask again at each epoch's start after the first, every K steps."""
        every = self.reprofile_every
        if every is None or not ((step_in_epoch == 0 and epoch > 1) or (step_in_epoch and step_in_epoch % every == 0)):
            return
        context = self.context
        at = {"epoch": epoch, "step": step_in_epoch}
        mask = reprofile(
            self.mask, model, context.scorer, context.mastered, context.inject, batch_size=context.batch_size, at=at
        )
        for name, frozen in self.frozen.items():  # in place: the optimizer holds these tensors
            frozen.copy_(pack_frozen(mask.collaborative(name).logical_not_()))
        self.profiles.append(mask)

    def describe(self) -> dict[str, Any]:
        """The mask's id and collaborative share (masks profiled during training: ``run.json``'s ``made_masks``)."""
        return {"mask_id": self.mask.id, "collaborative_share": self.mask.collaborative_share()}

    def made_masks(self) -> list[Mask]:
        """The masks profiled during training."""
        return list(self.profiles)


@dataclass
class SignOptions(RefreshOptions):
    """Options of the per-step rule: its refresh schedule, and whether to keep what each refresh found."""

    keep_signs: bool = option(
        False, "with --retain: keep each refreshed sign set in the run (DIR/masks/) as a retain set, registered"
    )
    confidence: float | None = option(None, f"{CONFIDENCE_HELP}; with --retain, the retain set's")
    uncertain: str | None = option(None, f"{UNCERTAIN_HELP}; default: a retain set's, else pass")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.measure()  # refuses options that do not go together, before any model loads

    def measure(self) -> SignMeasure:
        """How the signs are measured, from these options alone (a retain set brings its own)."""
        return SignMeasure.given(self.objective, self.confidence, self.uncertain)


class DynamicCPL(Method):
    """The paper's rule: keep the entries of each step's gradient that agree in sign with ``g_M``.

    Given a retain set (``--retain``, as ``context.mask``), the first step takes its stored signs
    instead of a pass over M, and every refresh is over the retain set's questions (the run puts
    them in ``context.mastered``); with ``keep_signs`` each refresh is kept as a child retain set.
    """

    name = "dynamic"

    def __init__(self, context: MethodContext, options: SignOptions | None = None) -> None:
        options = options or SignOptions()
        context.require_mastered(self.name)
        self.retain = context.mask
        self.check_options(options, retain=self.retain is not None)
        if self.retain is not None:
            self.retain.require_kind("retain", "--method dynamic")
            measure = retain_measure(self.retain, vars(options))
        else:
            measure = options.measure()
        self.measure = measure
        self.reference = mastered_signs(context, options, measure)
        self.keep_signs = options.keep_signs
        self.refreshed: list[Mask] = []

    @classmethod
    def check_options(cls, options: SignOptions, *, retain: bool) -> None:
        """Refuse what needs a retain set without one: keeping refreshed signs, and never refreshing."""
        if retain:
            return
        if options.keep_signs:
            raise CplError("--keep-signs needs --retain (the retain set the kept signs descend from)")
        if options.never:
            raise CplError(
                "--refresh-every 0 needs --retain: a run that never refreshes steers by stored signs to the end "
                "(a resumed run reads them again); profile them with cpl-masks profile --kind retain"
            )

    def before_step(self, model: torch.nn.Module, epoch: int, step_in_epoch: int) -> None:
        """Recompute ``g_M`` at the start of each epoch and every ``refresh_every`` steps within it.

        A run's very first step starts from the retain set's signs, profiled at these same weights; a
        run that never refreshes keeps them to the end, resumed or not.
        """
        starting = (epoch, step_in_epoch) == (1, 0) or (self.reference.schedule.never and self.reference.kept is None)
        if self.retain is not None and starting:
            self.reference.hold(self.retain.signs().to(next(model.parameters()).device))
            return
        refreshed = self.reference.refresh_if_due(model, epoch, step_in_epoch)
        if refreshed and self.keep_signs and self.retain is not None:
            at = {"epoch": epoch, "step": step_in_epoch}
            self.refreshed.append(refreshed_retain(self.retain, self.reference.value, weights_metadata(model), at))

    def describe(self) -> dict[str, Any]:
        """How the signs were measured, and the retain set's id when the run started from one."""
        described: dict[str, Any] = {"sign_measure": self.measure.to_metadata()}
        return described | ({"retain_id": self.retain.id} if self.retain is not None else {})

    def made_masks(self) -> list[Mask]:
        """The refreshed sign sets, with ``keep_signs``."""
        return list(self.refreshed)

    def mask_gradients(self, model: torch.nn.Module) -> None:
        """Zero, in place, the gradient entries whose sign disagrees with ``g_M`` (``g ⊙ g_M < 0``)."""
        self.reference.value.drop_disagreeing(model)


class RandomSigns(Method):
    """The per-step rule's control (``random-signs``): steered by random signs instead of g_M's.

    Each entry's sign is + or − with even odds, drawn afresh on the rule's schedule (each epoch's
    start, every ``refresh_every`` steps) from (seed, epoch, step), so a resumed run draws the same.
    A step keeps about half its entries, each moving in one direction until the next draw: whatever
    the rule protects beyond this control comes from g_M, not from the shape of the rule.
    """

    name = "random-signs"

    def __init__(self, context: MethodContext, options: ScheduleOptions | None = None) -> None:
        self.schedule = options or ScheduleOptions()
        self.seed = context.seed
        self.signs: PackedSigns | None = None

    def before_step(self, model: torch.nn.Module, epoch: int, step_in_epoch: int) -> None:
        """Draw the signs again when the schedule says so; a run that never refreshes keeps its first draw,
        drawn again on resume."""
        if self.schedule.never:
            if self.signs is None:
                self._draw(model, 1, 0)
        elif self.schedule.due(epoch, step_in_epoch):
            self._draw(model, epoch, step_in_epoch)

    def _draw(self, model: torch.nn.Module, epoch: int, step_in_epoch: int) -> None:
        """The signs drawn for the refresh at (epoch, step): the same in every process and resume."""
        shapes = {name: parameter.shape for name, parameter in model.named_parameters()}
        drawn = PackedSigns.random(shapes, f"cpl-masks:random-signs:{self.seed}:{epoch}:{step_in_epoch}")
        self.signs = drawn.to(next(model.parameters()).device)

    def mask_gradients(self, model: torch.nn.Module) -> None:
        """Zero, in place, the gradient entries whose sign disagrees with the drawn signs."""
        if self.signs is None:
            raise RuntimeError("random-signs: a step before the first draw")
        self.signs.drop_disagreeing(model)

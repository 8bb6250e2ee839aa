"""The per-step rule in any PyTorch loop: a retain set steering transformers' ``Trainer`` or your own.

::

    retain = Mask.from_ref("owner/name")         # a retain set (profile --kind retain)
    retain.apply(trainer, tokenizer=tokenizer)   # before trainer.train()

Every trainable parameter gets a post-accumulate-grad hook that zeroes the entries of its gradient
whose sign disagrees with sign(g_M) (``g ⊙ g_M < 0``), as the gradient accumulates: clipping and
the optimizer see only the kept entries, in any loop (the same mechanism, and the same reasons, as
:mod:`cpl_masks.integrations.trainer`). With gradient accumulation the rule applies to each micro-batch's
running sum, so the step's final gradient agrees in sign with g_M wherever it is non-zero.

The signs start as the retain set's own (profiled at these weights) and are recomputed over its
items (multiple-choice questions or free-form rows, scored as it records: its ``scoring`` and ``loss_on``),
at the current weights, on the schedule of the training loop's per-step rule
(:class:`~cpl_masks.methods.base.ScheduleOptions`: each epoch's start after the first, and every
``refresh_every`` optimizer steps within an epoch; 0: never), by a Trainer callback; a hand-written loop calls
:meth:`SignRuleHandle.refresh` when it wants. A refresh runs in eval mode, with the rule's hooks
paused, between optimizer steps (it takes over ``.grad`` for its own pass, and leaves the model's activation
checkpointing as it found it: TRL's ``SFTConfig`` turns it on). Unlike a freeze mask
the rule moves entries a step leaves at zero only through the optimizer's own state (momentum,
weight decay), so the paper's setting is plain SGD. One process: under DDP every rank would refresh alone.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from cpl_masks.errors import CplError
from cpl_masks.masks.format import Mask
from cpl_masks.masks.signs import PackedSigns
from cpl_masks.methods.base import ScheduleOptions
from cpl_masks.profiling.retain import measure_signs, retain_measure, retain_questions
from cpl_masks.scoring.base import DEFAULT_SCORING
from cpl_masks.scoring.completion import DEFAULT_LOSS_ON
from cpl_masks.scoring.scorers import make_scorer


class SignRuleHandle:
    """A retain set applied to a model: gradient hooks steering by sign(g_M), refreshed from its questions.

    Made by :func:`apply_retain`; :meth:`remove` takes every hook and callback away.
    """

    def __init__(
        self, retain: Mask, model: torch.nn.Module, tokenizer: Any, *, batch_size: int, schedule: ScheduleOptions
    ) -> None:
        self.retain = retain
        self.model = model
        loss_on = retain.metadata.get("loss_on") or DEFAULT_LOSS_ON  # as its free-form items were measured
        self.scorer = make_scorer(retain.metadata.get("scoring") or DEFAULT_SCORING, tokenizer, loss_on=loss_on)
        self.questions = retain_questions(retain)
        self.measure = retain_measure(retain)
        self.batch_size = batch_size
        self.schedule = schedule
        self.signs: PackedSigns = retain.signs().to(next(model.parameters()).device)
        self.refreshes = 0
        self._paused = False
        self._hooks: list[Any] = []
        self._trainer: tuple[Any, Any] | None = None
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                self._hooks.append(parameter.register_post_accumulate_grad_hook(functools.partial(self._keep, name)))

    def _keep(self, name: str, parameter: torch.nn.Parameter) -> None:
        """Post-accumulate-grad hook: zero the entries of the gradient that disagree in sign with g_M."""
        if not self._paused:
            self.signs.drop_disagreeing_in(name, parameter.grad)

    def refresh(self) -> None:
        """Recompute sign(g_M) over the retain set's questions at the model's current weights, measured as
        the retain set records (its loss and confidence)."""
        training = self.model.training
        checkpointing = _checkpointing_state(self.model)  # the pass turns it on, then off
        self._paused = True
        self.model.eval()
        try:
            self.signs = measure_signs(
                self.model, self.scorer, self.questions, self.measure, batch_size=self.batch_size
            )
        finally:
            self._paused = False
            self.model.train(training)
            _restore_checkpointing(checkpointing)
        self.refreshes += 1

    def remove(self) -> None:
        """Take the hooks and the Trainer callback away; the model trains plainly again."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._trainer is not None:
            trainer, callback = self._trainer
            trainer.remove_callback(callback)
            self._trainer = None

    def __enter__(self) -> SignRuleHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def apply_retain(
    retain: Mask,
    target: Any,
    *,
    tokenizer: Any = None,
    batch_size: int = 16,
    refresh_every: int | None = None,
    allow_other_weights: bool = False,
) -> SignRuleHandle:
    """Make ``target`` (a module, or a transformers ``Trainer``) train by the per-step rule of ``retain``.

    Args:
        retain: a retain set; it must fit the model (names, shapes and, unless allowed, weights).
        target: a ``torch.nn.Module`` or a ``Trainer`` (whose epochs then refresh the signs).
        tokenizer: to score the retain set's questions; default: the Trainer's ``processing_class``.
        batch_size: questions per forward pass of a refresh.
        refresh_every: with a Trainer, also refresh every K optimizer steps; 0: never, the stored
            signs steer to the end (no callback is added).
        allow_other_weights: accept weights other than those the signs were profiled at.

    Raises:
        CplError: not a retain set, a target that is neither, no tokenizer, or a model it does not fit.
    """
    retain.require_kind("retain", "apply")
    trainer = target if is_trainer(target) else None
    model = trainer.model if trainer is not None else target
    if not isinstance(model, torch.nn.Module):
        raise CplError(f"apply: expected a torch module or a transformers Trainer, got {type(target).__name__}")
    tokenizer = tokenizer if tokenizer is not None else getattr(trainer, "processing_class", None)
    if tokenizer is None:
        raise CplError("apply: a retain set needs the tokenizer (tokenizer=...) to score its questions")
    schedule = ScheduleOptions(refresh_every=refresh_every)
    retain.check_model(model, allow_other_weights=allow_other_weights)
    handle = SignRuleHandle(retain, model, tokenizer, batch_size=batch_size, schedule=schedule)
    if trainer is not None and not schedule.never:
        callback = _refresh_callback_class()(handle)
        trainer.add_callback(callback)
        handle._trainer = (trainer, callback)
    return handle


_CHECKPOINTING = ("gradient_checkpointing", "_gradient_checkpointing_func")  # transformers' per-module attributes


def _checkpointing_state(model: torch.nn.Module) -> list[tuple[torch.nn.Module, dict[str, Any]]]:
    """Each module's activation-checkpointing flag and function, as a Trainer's ``gradient_checkpointing`` set them.

    A refresh's pass enables checkpointing and disables it after, which would leave a Trainer that
    checkpoints (TRL's ``SFTConfig`` does by default) training without it; restoring these keeps it on.
    """
    return [
        (module, {key: getattr(module, key) for key in _CHECKPOINTING if hasattr(module, key)})
        for module in model.modules()
        if hasattr(module, _CHECKPOINTING[0])
    ]


def _restore_checkpointing(state: list[tuple[torch.nn.Module, dict[str, Any]]]) -> None:
    """Put back what :func:`_checkpointing_state` read."""
    for module, attributes in state:
        for key, value in attributes.items():
            setattr(module, key, value)


def is_trainer(target: Any) -> bool:
    """Duck-typed transformers ``Trainer`` (so neither this module nor :mod:`cpl_masks.integrations.trainer` imports
    transformers to tell one from a model)."""
    return not isinstance(target, torch.nn.Module) and hasattr(target, "add_callback") and hasattr(target, "model")


@functools.cache
def _refresh_callback_class() -> type:
    """The Trainer callback class, built on first use so importing this module needs no transformers."""
    from transformers import TrainerCallback

    class SignRefreshCallback(TrainerCallback):
        """Refreshes sign(g_M) before the optimizer steps its handle's schedule says are due."""

        def __init__(self, handle: SignRuleHandle) -> None:
            self.handle = handle
            self.epoch = 0
            self.step_in_epoch = 0

        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.epoch += 1
            self.step_in_epoch = 0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            """Before a step (gradients cleared); a fresh run's first step starts from the stored signs,
            profiled at these weights."""
            if state.global_step > 0 and self.handle.schedule.due(self.epoch, self.step_in_epoch):
                self.handle.refresh()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.step_in_epoch += 1

    return SignRefreshCallback

"""Train only a mask's collaborative entries in any PyTorch loop: transformers' ``Trainer``, TRL, or your own.

Two added lines turn an existing ``Trainer`` / ``SFTTrainer`` script into CPL training::

    mask = Mask.from_ref("owner/name")  # a file, a registry name or id, or a Hub repo
    mask.apply(trainer)                 # before trainer.train()

A hand-written loop passes its optimizer instead: ``mask.apply(model, optimizer)``. The returned
:class:`MaskHandle` undoes everything with :meth:`MaskHandle.remove` (or as a context manager).

**The mechanism, and why this one.** Three traps decide it:

* *Gradient clipping.* ``Trainer`` clips the gradient norm *before* it calls the
  ``on_pre_optimizer_step`` callback, so masking there would clip with a norm that counts the
  frozen gradients. Instead every partly frozen parameter gets a post-accumulate-grad hook
  (``Tensor.register_post_accumulate_grad_hook``) that zeroes the frozen entries of ``.grad`` as soon
  as autograd accumulates into it: after every backward of every micro-batch. Clipping, gradient
  accumulation and the optimizer's moments all see only masked gradients, in any loop, without
  subclassing (so TRL's trainers work as they are). Under DDP the hook runs inside autograd's
  gradient accumulation, before DDP's reducer copies the gradient into its all-reduce bucket, so
  every rank reduces masked gradients.
* *Decoupled weight decay.* AdamW (and SGD with ``weight_decay``) moves entries whose gradient is
  zero. So the optimizer step is guarded: a step pre-hook copies the frozen entries of each partly
  frozen parameter (one compact 1-D tensor, freed after the step) and a step post-hook writes them
  back. Frozen entries stay bit-identical whatever the optimizer (any ``optim`` the Trainer names),
  its decay or its param groups. The project's own loop uses :class:`~cpl_masks.training.loop.MaskedAdamW`
  instead, which also drops the moments of frozen entries, but it is AdamW only, with one param
  group; a Trainer builds its own optimizer, grouped by decay.
* *The Trainer creates its optimizer inside* ``train()``. So applying a mask to a Trainer masks
  the model at once and adds a callback that guards the optimizer at ``on_train_begin``, when it
  exists; a second ``train()`` with a new optimizer moves the guard to it.

Tensors without any collaborative entry stop requiring gradients (no gradient, no optimizer state,
and a Trainer leaves them out of its optimizer when the mask is applied before ``train()``); tensors
without any frozen entry get no hook. Parameters sharded by FSDP2 (DTensors) are refused, when
the mask is applied and again when an optimizer is guarded (a Trainer may shard inside ``train()``):
their local shards do not match the mask's full-shape bits (:mod:`cpl_masks.utils.distributed` shards
masks for the project's own loop).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cpl_masks.errors import CplError
from cpl_masks.integrations.sign_rule import SignRuleHandle, apply_retain, is_trainer
from cpl_masks.masks.format import Mask

if TYPE_CHECKING:
    from cpl_masks.registry import Registry

HUB_PREFIX = "hf://"  # forces a Hub repo: hf://owner/name[@revision]
_APPLIED: weakref.WeakKeyDictionary[torch.nn.Module, MaskHandle] = weakref.WeakKeyDictionary()


def load_mask(ref: str, *, scores: bool = False, registry: Registry | None = None) -> Mask:
    """Load a mask from a file path, a registry reference, or a Hub repo ``owner/name[@revision]``.

    The registry is asked first (a file path, an id or unique id prefix, ``name@vN`` or ``name``),
    since registry names look like repo ids too. Only a reference the registry does not know at all
    (neither it nor its part before ``@``) that reads as a valid repo id is pulled from the Hub,
    through :func:`cpl_masks.hub.pull`: into the Hub cache, its content id verified, then registered
    (so its registry name works offline afterwards). A name the registry knows whose stored file is
    missing or changed is an error, never a cue to fetch a stranger's repo of that name.
    ``hf://owner/name[@revision]`` always goes to the Hub.

    Args:
        ref: what names the mask.
        scores: also load the stored scores, if the file has them (not needed to train).
        registry: the registry to ask and to register a pulled mask in (None: the default one).

    Raises:
        CplError: nothing by that name, a damaged stored file, a failed or unverifiable download, or a bad file.
    """
    from cpl_masks.hub import pull
    from cpl_masks.registry import Registry

    registry = registry or Registry()
    if ref.startswith(HUB_PREFIX):
        return Mask.load(pull(ref.removeprefix(HUB_PREFIX), registry=registry).path, scores=scores)
    try:
        path = registry.resolve(ref)
    except CplError as error:
        if not _unknown_hub_ref(ref, registry):
            raise
        try:
            path = pull(ref, registry=registry).path
        except CplError as hub_error:
            raise CplError(f"{error}; as a Hub repo: {hub_error}") from hub_error
    return Mask.load(path, scores=scores)


def _unknown_hub_ref(ref: str, registry: Registry) -> bool:
    """Whether ``ref`` may go to the Hub: a valid ``owner/name[@revision]``, no file name, and a reference
    the registry knows nothing of (neither ``ref`` nor its name before ``@``, whatever state its file is in)."""
    from cpl_masks.hub import is_hub_target

    if ref.endswith(".safetensors") or Path(ref).expanduser().exists() or not is_hub_target(ref):
        return False
    return not any(_registry_knows(registry, candidate) for candidate in {ref, ref.partition("@")[0]})


def _registry_knows(registry: Registry, ref: str) -> bool:
    """Whether the registry has a row for ``ref`` (its file is not read: a damaged file is still known)."""
    try:
        registry.show(ref)
    except CplError:
        return False
    return True


@dataclass
class _FrozenEntries:
    """A partly frozen parameter and its bool mask (True = frozen), moved to the gradient's device on use."""

    parameter: torch.nn.Parameter
    frozen: torch.Tensor  # bool, parameter shape

    def on(self, device: torch.device) -> torch.Tensor:
        """The frozen mask on ``device``; kept there, since a model moves once, not every step."""
        if self.frozen.device != device:
            self.frozen = self.frozen.to(device)
        return self.frozen

    def zero_gradient(self, parameter: torch.nn.Parameter) -> None:
        """Post-accumulate-grad hook: zero the frozen entries of the just-accumulated gradient."""
        parameter.grad.masked_fill_(self.on(parameter.grad.device), 0)


class MaskHandle:
    """A mask applied to a model: gradient hooks, an optional optimizer guard and Trainer callback.

    Made by :meth:`Mask.apply`; :meth:`remove` restores the model exactly (``requires_grad`` flags,
    no hook left) and detaches from the optimizer and the Trainer.
    """

    def __init__(self, mask: Mask, model: torch.nn.Module) -> None:
        self.mask = mask
        self.model = model
        self._flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
        self._partial: list[_FrozenEntries] = []
        self._whole: list[torch.nn.Parameter] = []  # no collaborative entry: requires_grad off
        self._grad_hooks: list[Any] = []  # torch RemovableHandle
        self._optimizer: torch.optim.Optimizer | None = None
        self._optimizer_hooks: list[Any] = []
        self._trainer: tuple[Any, Any] | None = None  # (Trainer, its guard callback)
        self.active = False

    def _attach(self) -> None:
        """Freeze wholly frozen tensors and hook the gradient of partly frozen ones."""
        for name, parameter in self.model.named_parameters():
            if not parameter.requires_grad:
                continue  # frozen before the mask came: it stays so
            collaborative = self.mask.collaborative(name).to(parameter.device)  # bool, param shape
            if not collaborative.any():
                parameter.requires_grad_(False)
                self._whole.append(parameter)
            elif not collaborative.all():
                entries = _FrozenEntries(parameter, collaborative.logical_not_())
                self._partial.append(entries)
                self._grad_hooks.append(parameter.register_post_accumulate_grad_hook(entries.zero_gradient))
        if not any(parameter.requires_grad for parameter in self.model.parameters()):
            self._restore_flags()
            raise CplError(f"mask {self.mask.id[:12]}: nothing to train, it freezes every trainable entry")
        self.active = True

    def guard(self, optimizer: Any) -> None:
        """Make every step of ``optimizer`` leave the frozen entries bit-identical.

        Accepts a torch optimizer or a wrapper holding one as ``.optimizer`` (accelerate's
        ``AcceleratedOptimizer``, as a Trainer's is). Guarding another optimizer releases the last.
        """
        inner = _unwrap_optimizer(optimizer)
        if inner is self._optimizer:
            return
        _check_unsharded(parameter for group in inner.param_groups for parameter in group["params"])
        self._release_optimizer()
        held = {id(parameter) for group in inner.param_groups for parameter in group["params"]}
        partial = [entries for entries in self._partial if id(entries.parameter) in held]
        whole = [parameter for parameter in self._whole if id(parameter) in held]
        saved: list[torch.Tensor] = []  # per entry of `partial`: (n_frozen,) values before the step

        def before_step(*_: Any) -> None:
            for parameter in whole:
                parameter.grad = None  # torch optimizers skip a parameter without a gradient
            saved[:] = [
                entries.parameter.detach().masked_select(entries.on(entries.parameter.device)) for entries in partial
            ]

        def after_step(*_: Any) -> None:
            with torch.no_grad():
                for entries, values in zip(partial, saved, strict=True):
                    entries.parameter.masked_scatter_(entries.on(entries.parameter.device), values)
            saved.clear()

        self._optimizer_hooks = [inner.register_step_pre_hook(before_step), inner.register_step_post_hook(after_step)]
        self._optimizer = inner

    def remove(self) -> None:
        """Undo the mask: remove every hook and callback and restore the ``requires_grad`` flags."""
        for hook in self._grad_hooks:
            hook.remove()
        self._grad_hooks = []
        self._release_optimizer()
        if self._trainer is not None:
            trainer, callback = self._trainer
            trainer.remove_callback(callback)
            self._trainer = None
        self._restore_flags()
        if _APPLIED.get(self.model) is self:
            del _APPLIED[self.model]
        self.active = False

    def __enter__(self) -> MaskHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def _release_optimizer(self) -> None:
        for hook in self._optimizer_hooks:
            hook.remove()
        self._optimizer_hooks, self._optimizer = [], None

    def _restore_flags(self) -> None:
        for parameter, flag in self._flags:
            parameter.requires_grad_(flag)


def apply(mask: Mask, target: Any, optimizer: Any = None, **options: Any) -> MaskHandle | SignRuleHandle:
    """``mask.apply(target)``: a freeze mask through :func:`apply_mask`, a retain set through
    :func:`~cpl_masks.integrations.sign_rule.apply_retain` (which takes ``tokenizer=`` and ``refresh_every=``)."""
    if mask.kind == "retain":
        if optimizer is not None:
            raise CplError("apply: a retain set steers gradients; it takes no optimizer")
        return apply_retain(mask, target, **options)
    return apply_mask(mask, target, optimizer, **options)


def apply_mask(
    mask: Mask,
    target: Any,
    optimizer: Any = None,
    *,
    allow_other_weights: bool = False,
) -> MaskHandle:
    """Make ``target`` train only ``mask``'s collaborative entries; see the module docstring for how.

    Args:
        mask: the freeze mask; it must fit the model's parameter names and shapes.
        target: a ``torch.nn.Module``, or a transformers ``Trainer`` (TRL's trainers included),
            whose model is masked now and whose optimizer is guarded when ``train()`` creates it.
        optimizer: the optimizer of a hand-written loop, so no step moves a frozen entry. Without
            it (and without a Trainer) only gradients are masked: enough for plain SGD, not for
            weight decay.
        allow_other_weights: accept a model whose weights differ from those the mask was profiled on.

    Returns:
        The handle whose :meth:`MaskHandle.remove` undoes it all.

    Raises:
        CplError: the target is neither, its parameters are sharded, the mask does not fit it or
            was profiled on other weights, it already carries a mask, or nothing would train.
    """
    mask.require_kind("mask", "apply_mask")
    trainer = target if is_trainer(target) else None
    model = trainer.model if trainer is not None else target
    if not isinstance(model, torch.nn.Module):
        raise CplError(f"mask.apply: expected a torch module or a transformers Trainer, got {type(target).__name__}")
    _check_unsharded(model.parameters())
    if model in _APPLIED:
        raise CplError(f"this model already carries mask {_APPLIED[model].mask.id[:12]}; remove() that handle first")
    mask.check_model(model, allow_other_weights=allow_other_weights)
    handle = MaskHandle(mask, model)
    handle._attach()
    _APPLIED[model] = handle
    if optimizer is not None:
        handle.guard(optimizer)
    if trainer is not None:
        callback = _guard_callback_class()(handle)
        trainer.add_callback(callback)
        handle._trainer = (trainer, callback)
    return handle


def _check_unsharded(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Refuse DTensor (FSDP2 / tensor-parallel) parameters: the mask's bits cover full tensors."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support has no sharded parameters
        return
    if any(isinstance(parameter, DTensor) for parameter in parameters):
        raise CplError(
            "mask.apply: the parameters are sharded (FSDP2 / DTensor), which it does not support; "
            "use an unsharded or DDP model"
        )


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The innermost torch optimizer: accelerate's wrapper keeps it as ``.optimizer`` and only forwards ``step``."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise CplError(f"mask.apply: cannot guard a {type(optimizer).__name__}; it is not a torch optimizer")
    return optimizer


@functools.cache
def _guard_callback_class() -> type:
    """The Trainer callback class, built on first use so importing this module needs no transformers."""
    from transformers import TrainerCallback

    class MaskGuardCallback(TrainerCallback):
        """Guards the optimizer a Trainer creates inside ``train()``, so no step moves a frozen entry."""

        def __init__(self, handle: MaskHandle) -> None:
            self.handle = handle

        def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
            """Guard the optimizer, which exists from here on (a second ``train()`` may bring a new one)."""
            if optimizer is None:
                raise CplError("mask.apply: the Trainer started training without an optimizer to guard")
            self.handle.guard(optimizer)

    return MaskGuardCallback

"""Wrapping a model for DDP or FSDP2, and moving tensors between whole and sharded.

Training wraps the model in DDP or FSDP2 (:func:`wrap_for_training`); under FSDP2 each parameter
is a DTensor sharded on dim 0, and the freeze masks are sharded the same way
(:func:`shard_frozen_masks`), so a static mask costs each rank only its shard. Whole tensors are
gathered one at a time (:func:`full_tensors`, :func:`whole_from_local`), so no rank ever holds more
than one whole tensor of the model beside its shards.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from cpl_masks.errors import CplError
from cpl_masks.utils.distributed import active

WRAPPINGS = ("ddp", "fsdp2")


def wrapping_for(requested: str | None) -> str | None:
    """The training wrapping: None in one process, else ``requested`` (``ddp`` by default)."""
    if requested is not None and requested not in WRAPPINGS:
        raise CplError(f"--distributed {requested}: choose one of {', '.join(WRAPPINGS)}")
    if not active():
        return None
    return requested or "ddp"


def wrap_for_training(
    model: torch.nn.Module, wrapping: str | None, method: str, shardable: Sequence[str]
) -> torch.nn.Module:
    """The module a training step runs its forward through; ``model`` itself stays the bare module.

    ``ddp`` returns a ``DistributedDataParallel`` around ``model`` (it shares its parameters, so
    hooks, evaluation and saving keep using ``model`` and its parameter names; like a transformers
    model it has the ``device`` the scorers place their inputs on). ``fsdp2`` shards ``model``
    in place, each decoder layer and then the root (every parameter becomes a DTensor), and returns
    ``model``. Call it after the method froze its tensors: DDP and FSDP2 skip frozen parameters.
    ``shardable`` names the methods that may run under FSDP2 (the methods table says which).
    """
    if wrapping is None:
        return model
    if wrapping == "ddp":
        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        from torch.nn.parallel import DistributedDataParallel

        # buffers (rotary frequencies) are the same on every rank: no broadcast before each forward
        quiet = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        buffers = {"forward_sync_buffers": False} if quiet else {"broadcast_buffers": False}
        return DistributedDataParallel(model, device_ids=ids, **buffers)
    if method not in shardable:
        raise CplError(f"--distributed fsdp2 trains --method {'|'.join(shardable)} only; use ddp for {method}")
    return shard_model(model)


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 in place: ``fully_shard`` each decoder layer, then the root (embeddings, norm, head).

    Every parameter becomes a DTensor sharded on dim 0 over all ranks; each forward and backward
    gathers one layer's weights at a time and gradients arrive reduce-scattered (averaged over the
    ranks). Names are unchanged. Returns ``model``.
    """
    fully_shard = _fully_shard()
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def _fully_shard() -> Callable[..., Any]:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise CplError(
            f"--distributed fsdp2 needs torch>=2.6 (torch.distributed.fsdp.fully_shard), not {torch.__version__}"
        ) from None
    return fully_shard


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP2 shards one by one: modules of a class transformers never splits."""
    kinds = set(getattr(model, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in kinds and module is not model]


def is_dtensor(tensor: Any) -> bool:
    """True for a DTensor (an FSDP2 parameter, gradient or sharded mask)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (its storage: in-place edits change the DTensor), else ``tensor`` itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def shard_like(full: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """``full`` (the parameter's shape, the same on every rank) as a DTensor placed like ``parameter``.

    Each rank keeps a copy of only its own slice; nothing is communicated.
    """
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(parameter.device), parameter.device_mesh, parameter.placements, src_data_rank=None)


def shard_frozen_masks(model: torch.nn.Module, frozen: dict[str, torch.Tensor]) -> None:
    """Replace, in place, each tensor's packed frozen rows by its DTensor shard matching the parameter.

    Packed row by row, the frozen entries have the parameter's first dimension, so sharded on it alike
    each rank holds the rows of its own shard, and zeroes and steps them locally.
    """
    for name, parameter in model.named_parameters():
        if name in frozen and is_dtensor(parameter) and not is_dtensor(frozen[name]):
            frozen[name] = shard_like(frozen[name], parameter)


def full_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor whole, one at a time: a DTensor is gathered (a collective: every rank must iterate)."""
    for name, tensor in named:
        yield name, (tensor.full_tensor() if is_dtensor(tensor) else tensor).detach()


def copy_full_into(parameter: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into ``parameter``; a DTensor parameter takes only its own slice."""
    with torch.no_grad():
        if is_dtensor(parameter):
            local(parameter).copy_(local(shard_like(full, parameter)))
        else:
            parameter.copy_(full)


def whole_from_local(shard: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
    """The whole tensor of ``shard``, this rank's part of a tensor placed like the DTensor ``like``
    (None: ``shard`` is already whole). A collective: every rank must call it."""
    if like is None:
        return shard
    from torch.distributed.tensor import DTensor

    wire = shard.to(torch.uint8) if shard.dtype == torch.bool else shard  # gloo gathers no bool tensors
    spread = DTensor.from_local(wire, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())
    whole = spread.full_tensor()
    return whole.bool() if shard.dtype == torch.bool else whole

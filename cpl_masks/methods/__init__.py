"""Training methods, one family per module, all driven by the one loop in :mod:`cpl_masks.training.loop`.

``METHODS`` is the one table of methods: each name maps to its class, its options dataclass (whose
fields carry their default and help text, from which the CLI's ``train`` and ``sweep`` options are
generated) and what it can do. Adding a method is one module plus one entry here.
:func:`make_method` builds one from a name, a :class:`MethodContext` and the options given.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, NamedTuple

from cpl_masks.errors import CplError
from cpl_masks.methods.base import Method, MethodContext, RefreshOptions, ScheduleOptions, epoch_order, option
from cpl_masks.methods.ewc import EWC, EwcOptions
from cpl_masks.methods.lora import LoRA, LoraOptions
from cpl_masks.methods.masking import (
    DynamicCPL,
    FullFineTuning,
    NoOptions,
    RandomSigns,
    ReprofileOptions,
    SignOptions,
    StaticMask,
)
from cpl_masks.methods.projection import AGEM
from cpl_masks.methods.replay import Replay, ReplayOptions


class MethodSpec(NamedTuple):
    """A method's class, its options dataclass, one line saying what it does, and what it can do."""

    cls: type[Method]
    options: type
    summary: str
    needs_mask: bool = False  # trains through a static mask (--mask)
    fsdp2: bool = False  # its hooks only edit gradients in place, so it runs on FSDP2's sharded DTensors


class OptionField(NamedTuple):
    """One method option as the command line offers it: its type, default, help and the methods taking it."""

    name: str
    type: Any
    default: Any
    help: str
    methods: tuple[str, ...]


METHODS: dict[str, MethodSpec] = {
    "full": MethodSpec(FullFineTuning, NoOptions, "plain fine-tuning: every entry trains", fsdp2=True),
    "mask": MethodSpec(
        StaticMask,
        ReprofileOptions,
        "static CPL: only the mask's collaborative entries train",
        needs_mask=True,
        fsdp2=True,
    ),
    "dynamic": MethodSpec(DynamicCPL, SignOptions, "the paper's loop: per-step sign rule against g_M (or --retain's)"),
    "random-signs": MethodSpec(RandomSigns, ScheduleOptions, "the per-step rule's control: random signs, redrawn"),
    "lora": MethodSpec(LoRA, LoraOptions, "low-rank adapters through peft, base weights unchanged"),
    "replay": MethodSpec(Replay, ReplayOptions, "plain fine-tuning with mastered questions mixed into the stream"),
    "agem": MethodSpec(AGEM, RefreshOptions, "A-GEM: remove the step gradient's part against g_M when they conflict"),
    "ewc": MethodSpec(EWC, EwcOptions, "EWC: Fisher-weighted penalty pulling weights back to their start"),
}


def method_options(name: str, options: dict[str, Any] | None = None) -> Any:
    """The options dataclass of method ``name`` from a dict, refusing options that do not apply to it."""
    spec = _spec(name)
    known = {field.name for field in dataclasses.fields(spec.options)}
    given = {key: value for key, value in (options or {}).items() if value is not None}
    for key in given:
        if key not in known:
            raise CplError(f"--{key.replace('_', '-')} does not apply to --method {name}")
    return spec.options(**given)


def option_fields() -> list[OptionField]:
    """Every option of every method in ``METHODS``, once each (an option several methods share lists them all)."""
    found: dict[str, OptionField] = {}
    hints: dict[str, Any] = {}
    for name, spec in METHODS.items():
        hints.update(typing.get_type_hints(spec.options))
        for item in dataclasses.fields(spec.options):
            known = found.get(item.name)
            methods = (*known.methods, name) if known else (name,)
            found[item.name] = OptionField(
                item.name, hints[item.name], item.default, item.metadata.get("help", ""), methods
            )
    return list(found.values())


def make_method(name: str, context: MethodContext, options: dict[str, Any] | None = None) -> Method:
    """Build method ``name`` with its options (a dict of option name to value, None meaning default)."""
    return _spec(name).cls(context, method_options(name, options))


def _spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise CplError(f"--method {name}: choose one of {', '.join(METHODS)}")
    return METHODS[name]


__all__ = [
    "METHODS",
    "Method",
    "MethodContext",
    "MethodSpec",
    "OptionField",
    "epoch_order",
    "make_method",
    "method_options",
    "option",
    "option_fields",
]

"""Assertions shared by the test files."""

from __future__ import annotations

import torch


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every named parameter, to compare against after training."""
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def assert_frozen_unchanged(before_state: dict[str, torch.Tensor], model: torch.nn.Module, mask) -> None:
    """Every entry the mask freezes (collaborative bit 0) is bit-identical to ``before_state``."""
    for name, parameter in model.named_parameters():
        frozen = mask.collaborative(name).logical_not()  # bool, parameter shape
        before = before_state[name][frozen].view(torch.uint8)  # raw bytes: bit-identical means equal bytes
        after = parameter.detach()[frozen].view(torch.uint8)
        changed = int((before != after).sum())
        assert changed == 0, f"{name}: {changed} bytes of frozen entries changed"

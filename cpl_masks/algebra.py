"""New masks from existing ones: bitwise combination, and re-cutting stored scores at another rule.

Both record where the result came from: ``parents`` (the input masks' ids) and the operation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cpl_masks.errors import CplError
from cpl_masks.masks import Mask
from cpl_masks.profile import touched_collaborative, touched_counts
from cpl_masks.selection import Rule
from cpl_masks.versions import stamp

OPERATIONS = ("and", "or", "majority")


def combine(masks: Sequence[Mask], op: str) -> Mask:
    """Combine masks of the same weights: ``and`` / ``or`` of the collaborative sets, or ``majority``.

    ``majority`` keeps an entry collaborative when more than half of the masks say so.
    """
    if op not in OPERATIONS:
        raise CplError(f"--op {op}: choose one of {', '.join(OPERATIONS)}")
    if len(masks) < 2:
        raise CplError("combine needs at least two masks")
    first = masks[0]
    for other in masks[1:]:
        if other.shapes != first.shapes:
            raise CplError(f"masks {first.id[:12]} and {other.id[:12]} cover different parameters or shapes")
        if _fingerprint(other) != _fingerprint(first):
            raise CplError(f"masks {first.id[:12]} and {other.id[:12]} were profiled on different weights")
    bits = {name: _combine_tensor([mask.collaborative(name) for mask in masks], op) for name in first.names}
    metadata = {
        "model": first.metadata.get("model", {}),
        "rule": {"combine": op},
        "parents": [mask.id for mask in masks],
        **stamp(),
    }
    return Mask.from_bool(bits, metadata)


def recut(mask: Mask, *, threshold: float | None = None, keep_fraction: float | None = None) -> Mask:
    """Cut a mask's stored scores again at another threshold or keep fraction, without profiling.

    The tensor patterns of the original rule still apply; per-tensor statistics carry over.
    """
    if mask.scores is None:
        raise CplError(f"mask {mask.id[:12]} has no stored scores; profile it again with --save-scores")
    previous = Rule.from_metadata(mask.metadata.get("rule", {}))
    rule = Rule(
        threshold=threshold,
        keep_fraction=keep_fraction,
        freeze_pattern=previous.freeze_pattern,
        train_pattern=previous.train_pattern,
    )
    scores = {name: tensor.float() for name, tensor in mask.scores.items()}  # bf16 -> float32, parameter shape
    cut_key = rule.cut_key(scores.items())
    bits = {name: rule.select(name, scores[name], cut_key) for name in mask.names}
    metadata = {**mask.metadata, "rule": rule.to_metadata(), "parents": [mask.id], **stamp()}
    metadata["tensors"] = _recount(mask, bits, rule, cut_key)
    metadata["counts"] = touched_counts(metadata["tensors"])
    return Mask.from_bool(bits, metadata, scores=mask.scores)


def _recount(mask: Mask, bits: dict[str, torch.Tensor], rule: Rule, cut_key: int | None) -> dict[str, Any]:
    """Per-tensor statistics with the touched-collaborative count updated for the new bits."""
    tensors = mask.metadata.get("tensors") or {}
    updated = {}
    for name, stats in tensors.items():
        collaborative = int(bits[name].sum())
        keeps_zero = rule.keeps_zero(name, cut_key)
        updated[name] = {
            **stats,
            "touched_collaborative": touched_collaborative(
                collaborative, bits[name].numel(), stats["touched"], keeps_zero
            ),
        }
    return updated


def _combine_tensor(bits: list[torch.Tensor], op: str) -> torch.Tensor:
    stacked = torch.stack(bits)  # (n_masks, *param shape) bool
    if op == "and":
        return stacked.all(0)
    if op == "or":
        return stacked.any(0)
    return stacked.sum(0, dtype=torch.int32) * 2 > len(bits)


def _fingerprint(mask: Mask) -> str | None:
    return mask.metadata.get("model", {}).get("fingerprint")

"""New masks from existing ones: bitwise combination, and re-cutting stored scores at another rule.

Both record where the result came from: ``parents`` (the input masks' ids) and the operation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cpl_masks.errors import CplError
from cpl_masks.masks.format import Mask, check_finite_scores
from cpl_masks.profiling.freeze_mask import kept_touched, touched_counts
from cpl_masks.profiling.selection import Cut
from cpl_masks.utils.versions import stamp

OPERATIONS = ("and", "or", "majority")


def combine(masks: Sequence[Mask], op: str) -> Mask:
    """Combine masks of the same weights: ``and`` / ``or`` of the collaborative sets, or ``majority``.

    ``majority`` keeps an entry collaborative when more than half of the masks say so.
    """
    if op not in OPERATIONS:
        raise CplError(f"--op {op}: choose one of {', '.join(OPERATIONS)}")
    for mask in masks:
        mask.require_kind("mask", "combine")
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

    The tensor patterns of the original rule still apply; per-tensor statistics carry over, with
    the touched-collaborative counts of the new bits. The result records ``parents`` (the mask's
    id) and ``recut_of``, so it is filed as a re-cut.
    """
    mask.require_kind("mask", "threshold")
    if mask.scores is None:
        raise CplError(f"mask {mask.id[:12]} has no stored scores; profile it again with --save-scores")
    previous = mask.metadata.get("rule") or {}
    rule = Cut(
        threshold=threshold,
        keep_fraction=keep_fraction,
        freeze_pattern=previous.get("freeze_pattern"),
        train_pattern=previous.get("train_pattern"),
        statistic=previous.get("statistic", "product"),  # re-cut t-statistics stay t-statistics
    )
    check_finite_scores(mask.scores, f"mask {mask.id[:12]}")
    bits = rule.select_all({name: mask.scores[name] for name in mask.names})
    metadata = {**mask.metadata, "rule": rule.to_metadata(), "parents": [mask.id], "recut_of": mask.id, **stamp()}
    metadata["tensors"] = _recount(mask, bits)
    metadata["counts"] = touched_counts(metadata["tensors"])
    return Mask.from_bool(bits, metadata, scores=mask.scores)


def _recount(mask: Mask, bits: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per-tensor statistics with the touched-collaborative count updated for the new bits."""
    tensors = mask.metadata.get("tensors") or {}
    return {
        name: {**stats, "touched_collaborative": kept_touched(bits[name], mask.scores[name])}
        for name, stats in tensors.items()
    }


def _combine_tensor(bits: list[torch.Tensor], op: str) -> torch.Tensor:
    stacked = torch.stack(bits)  # (n_masks, *param shape) bool
    if op == "and":
        return stacked.all(0)
    if op == "or":
        return stacked.any(0)
    return stacked.sum(0, dtype=torch.int32) * 2 > len(bits)


def _fingerprint(mask: Mask) -> str | None:
    return mask.metadata.get("model", {}).get("fingerprint")

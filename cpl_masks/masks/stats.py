"""Reading a mask: collaborative shares by module type and layer, and how two masks differ.

Shares are counted from the packed bits (no unpacking), so they need no scores. Profiled masks also
carry, per tensor, how many entries the injection gradient touches (``g_I ≠ 0``) and the positive
and negative parts of ``g_M·g_I``; the summary reports each share over all entries and over
touched entries only, because untouched entries (e.g. embedding rows of tokens absent from the
data) score exactly 0 and the ``s ≥ 0`` rule calls them collaborative although no update moves them.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import IO, Any

from cpl_masks.errors import CplError
from cpl_masks.masks.bits import count_set_bits
from cpl_masks.masks.format import Mask

MODULE_TYPES = ("q", "k", "v", "o", "gate", "up", "down", "embeddings", "norms", "lm_head", "other")
_MODULE_PATTERNS = (
    ("embeddings", r"embed|wte|wpe"),
    ("lm_head", r"lm_head"),
    ("norms", r"norm"),
    ("q", r"q_proj"),
    ("k", r"k_proj"),
    ("v", r"v_proj"),
    ("o", r"o_proj|out_proj"),
    ("gate", r"gate_proj"),
    ("up", r"up_proj"),
    ("down", r"down_proj"),
)
_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")
_TENSOR_SUMS = ("touched", "touched_collaborative", "dot_positive", "dot_negative", "norm_m_sq", "norm_i_sq")


def module_type(name: str) -> str:
    """Module type of a parameter: q, k, v, o, gate, up, down, embeddings, norms, lm_head or other."""
    return next((kind for kind, pattern in _MODULE_PATTERNS if re.search(pattern, name)), "other")


def layer_of(name: str) -> str:
    """The transformer layer index of a parameter name, or ``"-"`` outside the layers."""
    found = _LAYER.search(name)
    return found.group(1) if found else "-"


def summarize(mask: Mask) -> dict[str, Any]:
    """Collaborative shares and gradient similarity: ``overall``, ``by_module`` and ``by_layer``.

    Each group holds ``entries``, ``collaborative``, ``share`` and, for profiled masks, ``touched``,
    ``touched_share`` (collaborative share among touched entries), ``dot``, ``dot_positive``,
    ``dot_negative`` and ``cosine`` of ``g_M`` and ``g_I``; those are None when the mask carries no
    per-tensor statistics (e.g. a combined mask).
    """
    tensors = mask.metadata.get("tensors") or {}
    rows = {name: _tensor_row(mask, name, tensors.get(name)) for name in mask.names}
    return {
        "overall": _group(rows.values()),
        "by_module": _grouped(rows, module_type, MODULE_TYPES),
        "by_layer": _grouped(rows, layer_of, None),
    }


def layer_module_grid(mask: Mask) -> dict[str, dict[str, dict[str, Any]]]:
    """Per layer, per module type: the same group statistics as :func:`summarize` (for heatmaps)."""
    tensors = mask.metadata.get("tensors") or {}
    by_layer: dict[str, dict[str, dict[str, Any]]] = {}
    for name in mask.names:
        by_layer.setdefault(layer_of(name), {})[name] = _tensor_row(mask, name, tensors.get(name))
    ordered = sorted(by_layer, key=_layer_sort_key)
    return {layer: _grouped(by_layer[layer], module_type, MODULE_TYPES) for layer in ordered}


def diff(first: Mask, second: Mask) -> dict[str, Any]:
    """Agreement (share of equal bits) and Jaccard of the collaborative sets, overall, by module and layer."""
    for mask in (first, second):
        mask.require_kind("mask", "diff")
    if first.shapes != second.shapes:
        different = [name for name in first.shapes if second.shapes.get(name) != first.shapes[name]]
        different += [name for name in second.shapes if name not in first.shapes]
        raise CplError(f"masks {first.id[:12]} and {second.id[:12]} cover different parameters: {different[:3]}")
    rows = {}
    for name in first.names:
        a, b = first.packed[name], second.packed[name]
        rows[name] = {
            "entries": first.entries_of(name),
            "different": count_set_bits(a ^ b),
            "both": count_set_bits(a & b),
            "either": count_set_bits(a | b),
        }
    return {
        "first": first.id,
        "second": second.id,
        "overall": _agreement(rows.values()),
        "by_module": _grouped(rows, module_type, MODULE_TYPES, combine=_agreement),
        "by_layer": _grouped(rows, layer_of, None, combine=_agreement),
    }


def _tensor_row(mask: Mask, name: str, stats: dict[str, Any] | None) -> dict[str, Any]:
    row: dict[str, Any] = {"entries": mask.entries_of(name), "collaborative": mask.collaborative_count(name)}
    row.update({key: None if stats is None else stats.get(key) for key in _TENSOR_SUMS})
    return row


def _group(rows: Any) -> dict[str, Any]:
    rows = list(rows)
    entries = sum(row["entries"] for row in rows)
    collaborative = sum(row["collaborative"] for row in rows)
    sums = {key: _sum_or_none(row[key] for row in rows) for key in _TENSOR_SUMS}
    touched, touched_collaborative = sums["touched"], sums["touched_collaborative"]
    group: dict[str, Any] = {
        "entries": entries,
        "collaborative": collaborative,
        "share": collaborative / entries if entries else 0.0,
        "touched": touched,
        "touched_collaborative": touched_collaborative,
        "touched_share": touched_collaborative / touched if touched else None,
        "dot_positive": sums["dot_positive"],
        "dot_negative": sums["dot_negative"],
        "dot": None,
        "cosine": None,
    }
    if sums["dot_positive"] is not None:
        group["dot"] = sums["dot_positive"] + sums["dot_negative"]
        group["cosine"] = _cosine(group["dot"], sums["norm_m_sq"], sums["norm_i_sq"])
    return group


def _cosine(dot: float, norm_m_sq: float, norm_i_sq: float) -> float | None:
    """cos(g_M, g_I) from the sums, within [-1, 1]; None when a gradient is zero.

    The norms are multiplied after their roots (their product may overflow); the result is held to
    [-1, 1], which float32 rounding (and squares underflowing where products do not) can pass by a hair.
    """
    norms = math.sqrt(norm_m_sq) * math.sqrt(norm_i_sq)
    return max(-1.0, min(1.0, dot / norms)) if norms else None


def _agreement(rows: Any) -> dict[str, Any]:
    rows = list(rows)
    entries = sum(row["entries"] for row in rows)
    either = sum(row["either"] for row in rows)
    return {
        "entries": entries,
        "agreement": 1 - sum(row["different"] for row in rows) / entries if entries else 1.0,
        "jaccard": sum(row["both"] for row in rows) / either if either else 1.0,
    }


def _grouped(
    rows: dict[str, dict[str, Any]],
    key: Callable[[str], str],
    order: tuple[str, ...] | None,
    combine: Callable[[Any], dict[str, Any]] = _group,
) -> dict[str, dict[str, Any]]:
    """Combine rows per group (module type or layer), in ``order`` or numeric layer order."""
    members: dict[str, list[dict[str, Any]]] = {}
    for name, row in rows.items():
        members.setdefault(key(name), []).append(row)
    names = [group for group in order if group in members] if order else sorted(members, key=_layer_sort_key)
    return {group: combine(members[group]) for group in names}


def _layer_sort_key(layer: str) -> tuple[int, int]:
    return (1, 0) if layer == "-" else (0, int(layer))


def _sum_or_none(values: Any) -> Any:
    values = list(values)
    return None if any(value is None for value in values) else sum(values)


def draw_share_heatmap(mask: Mask, path: str | os.PathLike | IO[bytes]) -> None:
    """Heatmap of the collaborative share, layers x module types (and over touched entries if known)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = layer_module_grid(mask)  # layer -> module type -> group statistics
    kinds = [kind for kind in MODULE_TYPES if any(kind in row for row in grid.values())]
    layers = list(grid)
    panels = [("share", "all entries")]
    if any(group["touched_share"] is not None for row in grid.values() for group in row.values()):
        panels.append(("touched_share", "entries g_I touches"))
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.3 * len(layers) + 2), squeeze=False)
    for axis, (key, label) in zip(axes[0], panels, strict=True):
        values = [[_share_cell(grid[layer].get(kind), key) for kind in kinds] for layer in layers]
        image = axis.imshow(values, vmin=0, vmax=1, aspect="auto", cmap="viridis")
        axis.set(xticks=range(len(kinds)), xticklabels=kinds, yticks=range(len(layers)), yticklabels=layers)
        axis.tick_params(axis="x", labelrotation=45)
        axis.set_title(f"collaborative share, {label}")
        axis.set_xlabel("module type")
        axis.set_ylabel("layer")
        figure.colorbar(image, ax=axis)
    figure.suptitle(f"mask {mask.id[:12]}")
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png")
    plt.close(figure)


def _share_cell(group: dict[str, Any] | None, key: str) -> float:
    value = None if group is None else group[key]
    return float("nan") if value is None else value

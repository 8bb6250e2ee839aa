"""The metadata of a mask file's header: the types of its fields and the ranges of its numbers.

:func:`check_metadata` is part of the one gate every mask file passes,
:func:`cpl_masks.masks.reading.read_header`: a field the tool reads back must have its JSON type,
and a number its range (a count at most the entries it counts, a sum of positive parts not
negative), so every statistic shown of a loaded mask is within its range. The header's JSON holds no
NaN or infinity at all (refused as it is parsed). Unknown fields, as a newer version may write,
are kept and never read.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cpl_masks.errors import CplError

SCORES_HASH_KEY = "scores_sha256"

# The metadata fields the tool reads back, and the JSON types they must have when present (None is
# always allowed). Unknown fields, as a newer version may write, are kept and never read.
_METADATA_TYPES: dict[str, type] = {
    "model": dict,
    "data": dict,
    "parents": list,
    "rule": dict,
    "recut_of": str,
    "task": str,
    "scoring": str,
    "loss": str,
    "created": str,
    "counts": dict,
    "profile": dict,
    "tensors": dict,
    "versions": dict,
    "retain": dict,
    SCORES_HASH_KEY: str,
}
_MODEL_FIELDS = ("ref", "fingerprint", "fingerprint_bf16", "dtype")
_DATA_TYPES: dict[str, type] = {"rows": int, "sha256": str, "path": str, "source": str}
_RETAIN_TYPES: dict[str, type] = {"questions": list, "objective": str, "uncertain": str}
# the whole-mask counts a file may record, each at most the mask's entries
COUNT_KEYS = ("entries", "collaborative", "touched", "touched_collaborative", "positive", "negative", "frozen")
# per-tensor gradient sums (all or none) and the sign each must have: a sum of positive parts,
# of negative parts, and two sums of squares
_DOT_SUMS = {"dot_positive": 1, "dot_negative": -1, "norm_m_sq": 1, "norm_i_sq": 1}


def check_metadata(path: Path, metadata: dict[str, Any], shapes: dict[str, Any]) -> None:
    """Refuse metadata whose fields (model, data, parents, counts, per-tensor statistics, a retain set's
    measure) have the wrong types or numbers out of their range."""

    def refuse(where: str, expected: str) -> CplError:
        return CplError(f"{path}: mask metadata '{where}' is not {expected}")

    for key, expected in _METADATA_TYPES.items():
        if not _is_json_type(metadata.get(key), expected) or (
            key == "model" and key in metadata and metadata[key] is None
        ):
            raise refuse(key, f"a JSON {_JSON_NAMES[expected]}")
    model = metadata.get("model") or {}
    for key in _MODEL_FIELDS:
        if model.get(key) is not None and not isinstance(model[key], str):
            raise refuse(f"model.{key}", "a string")
    for key, entry in (metadata.get("data") or {}).items():
        if not isinstance(entry, dict):
            raise refuse(f"data.{key}", "an object")
        for item, expected in _DATA_TYPES.items():
            if not _is_json_type(entry.get(item), expected):
                raise refuse(f"data.{key}.{item}", f"a JSON {_JSON_NAMES[expected]}")
        if entry.get("rows") is not None and entry["rows"] < 0:
            raise refuse(f"data.{key}.rows", "a count of rows (0 or more)")
    if not all(isinstance(parent, str) for parent in metadata.get("parents") or []):
        raise refuse("parents", "a list of mask ids")
    rule = metadata.get("rule") or {}
    for key in ("freeze_pattern", "train_pattern", "control", "like", "combine"):
        if rule.get(key) is not None and not isinstance(rule[key], str):
            raise refuse(f"rule.{key}", "a string")
    entries = sum(math.prod(shape) for shape in shapes.values())
    for key in COUNT_KEYS:
        value = (metadata.get("counts") or {}).get(key)
        if value is not None and not _is_count(value, entries):
            raise refuse(f"counts.{key}", f"a count from 0 to the mask's {entries} entries")
    _check_retain_fields(metadata, refuse)
    _check_tensor_stats(path, metadata.get("tensors") or {}, shapes, refuse)


def _check_retain_fields(metadata: dict[str, Any], refuse: Any) -> None:
    """A retain set's measure and questions: their types, a confidence of 0 or more, as many rows as questions.

    What each value means (an objective's name, a question's fields) is checked where it is used
    (:func:`cpl_masks.profiling.retain.retain_measure`, :func:`~cpl_masks.profiling.retain.retain_questions`).
    """
    retain = metadata.get("retain") or {}
    for key, expected in _RETAIN_TYPES.items():
        if not _is_json_type(retain.get(key), expected):
            raise refuse(f"retain.{key}", f"a JSON {_JSON_NAMES[expected]}")
    confidence = retain.get("confidence")
    if confidence is not None and not (_is_finite(confidence) and confidence >= 0):
        raise refuse("retain.confidence", "a number of standard errors (0 or more)")
    rows = ((metadata.get("data") or {}).get("mastered") or {}).get("rows")
    questions = retain.get("questions")
    if questions is not None and rows is not None and rows != len(questions):
        raise refuse("data.mastered.rows", f"the number of the retain set's questions ({len(questions)})")


def _check_tensor_stats(path: Path, tensors: dict[str, Any], shapes: dict[str, Any], refuse: Any) -> None:
    """Per-tensor statistics: of parameters of the mask, counts within the tensor, sums of their sign.

    ``touched`` counts at most the tensor's entries and ``touched_collaborative`` at most those, so
    every share a summary shows is within [0, 1]; the gradient sums are finite (as every number of
    the header), of their sign, and their totals over the tensors finite too, so no group's sum overflows.
    """
    for name, stats in tensors.items():
        where = f"tensors.{name}"
        if name not in shapes:
            raise refuse(where, "the statistics of one of the mask's parameters")
        if not isinstance(stats, dict):
            raise refuse(where, "an object")
        entries = math.prod(shapes[name])
        if not _is_count(stats.get("touched"), entries):
            raise refuse(f"{where}.touched", f"a count from 0 to the tensor's {entries} entries")
        if not _is_count(stats.get("touched_collaborative"), stats["touched"]):
            raise refuse(f"{where}.touched_collaborative", "a count from 0 to its touched entries")
        present = [key for key in _DOT_SUMS if stats.get(key) is not None]
        for key in present:
            if not _is_finite(stats[key]) or stats[key] * _DOT_SUMS[key] < 0:
                raise refuse(f"{where}.{key}", "a non-negative number" if _DOT_SUMS[key] > 0 else "a number <= 0")
        if "dot_positive" in present and len(present) != len(_DOT_SUMS):  # a control records norm_i_sq alone
            raise refuse(where, f"complete ({', '.join(_DOT_SUMS)} go together)")
    for key in _DOT_SUMS:
        if not _is_finite(sum(abs(float(stats.get(key) or 0)) for stats in tensors.values())):
            raise refuse(f"tensors.*.{key}", "summable (its total over the tensors overflows)")


_JSON_NAMES = {dict: "object", list: "list", str: "string", int: "integer"}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    """A number a float holds finitely (an integer too large for a float is not)."""
    try:
        return _is_number(value) and math.isfinite(value)
    except OverflowError:
        return False


def _is_count(value: Any, limit: float) -> bool:
    """A number from 0 to ``limit``: a count of ``limit`` things at most."""
    return _is_number(value) and 0 <= value <= limit


def _is_json_type(value: Any, expected: type) -> bool:
    """Whether ``value`` is None or of ``expected`` (a boolean is no integer here, unlike in Python)."""
    return value is None or (isinstance(value, expected) and not isinstance(value, bool))

"""Registry names: ``<model-slug>/<task>@vN``, and how a task name is chosen when none is given."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cpl_masks.data.questions import BUILTIN_DEMO
from cpl_masks.errors import CplError

MAX_TASK_CHARS = 64  # a task name is a word or two, not a paragraph
MAX_SLUG_CHARS = 96  # the longest Hub repo name
_TASK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_VERSIONED = re.compile(r"(?P<name>.+)@v(?P<version>[0-9]+)", re.DOTALL)  # whole string, ASCII digits only
MAX_VERSION = 2**63 - 1  # the largest integer SQLite stores: no version is larger
DERIVED_SUFFIXES = {"recut": ".recut", "reprofiled": ".reprofiled"}  # source -> suffix of its default name
_GENERIC_STEMS = {"inject", "injection", "mastered", "train", "data", "questions", "split"}


def slug(text: str) -> str:
    """Lower-case letters, digits, dots and dashes: ``HuggingFaceTB/SmolLM2-135M`` -> ``smollm2-135m``."""
    last = Path(str(text).rstrip("/")).name or str(text)
    last = last.removesuffix(".gguf")
    cleaned = re.sub(r"[^a-z0-9.]+", "-", last.lower())[:MAX_SLUG_CHARS].strip("-.")
    return cleaned or "model"


def check_task(task: str, option: str = "--name") -> str:
    """Accept a task name of at most 64 letters, digits, dots, dashes and underscores."""
    if len(task) > MAX_TASK_CHARS:
        raise CplError(f"{option} {task[:20]!r}...: {len(task):,} characters; a task name has at most {MAX_TASK_CHARS}")
    if not _TASK.match(task):
        raise CplError(f"{option} {task!r}: use letters, digits, '.', '-' and '_' only (no '/' or '@')")
    return task


def _is_task(text: str) -> bool:
    return len(text) <= MAX_TASK_CHARS and bool(_TASK.match(text))


def task_name(explicit: str | None, inject_path: str | None) -> str:
    """The task a mask or a run is filed under; one rule for both, so a mask and its runs agree.

    ``explicit`` (``--name``, ``--task``, or a mask's recorded ``task``) wins. Otherwise the
    injection file's stem names it, or its folder when the stem is generic (``runs/arc/inject.jsonl``
    is ``arc``), with characters a task name cannot hold replaced by ``-`` (``arc_train.jsonl`` is
    ``arc_train``); the built-in demo set is ``demo``; ``default`` when nothing fits.
    """
    if explicit:
        return explicit
    if not inject_path:
        return "default"
    if str(inject_path) == BUILTIN_DEMO:
        return "demo"
    path = Path(str(inject_path).rstrip("/"))
    for candidate in (path.stem, path.parent.name):
        cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", candidate).lstrip("._-")[:MAX_TASK_CHARS]
        if cleaned and cleaned.lower() not in _GENERIC_STEMS:
            return cleaned
    return "default"


def default_task(metadata: dict[str, Any]) -> str:
    """The task of a mask without a given one: :func:`task_name` of its provenance's task and injection file
    (a retain set's: its questions' file)."""
    recorded = metadata.get("task")
    data = metadata.get("data") or {}
    inject = data.get("inject") or data.get("mastered") or {}  # a retain set has no injection file
    source = (inject.get("path") or inject.get("source")) if isinstance(inject, dict) else None
    explicit = recorded if isinstance(recorded, str) and _is_task(recorded) else None
    return task_name(explicit, source if isinstance(source, str) else None)


def run_task(explicit: str | None, inject_path: str | None, *, inject_sha256: str, mask: dict[str, Any] | None) -> str:
    """The task a training run is filed under: ``explicit``, else its mask's task when the run trains
    on the very questions the mask was profiled on (``mask`` is the mask's metadata), else
    :func:`task_name` of its injection file — so a mask and the runs on its own data always agree.
    """
    inject = ((mask or {}).get("data") or {}).get("inject")
    if not explicit and isinstance(inject, dict) and inject.get("sha256") == inject_sha256:
        return default_task(mask or {})
    return task_name(explicit, inject_path)


def source_of(metadata: dict[str, Any], *, kind: str = "mask") -> str:
    """What made a mask: ``retain`` (a retain set, profiled or refreshed), ``control``, ``recut``,
    ``reprofiled``, ``combined`` or ``profiled``.

    ``kind`` is the file's own (:attr:`~cpl_masks.masks.format.Mask.kind`, from its header): a retain
    set is one by its kind, never by a ``retain`` key in its metadata, which any file may carry or
    lack. A pulled mask is what it was where it was made; where it came from is its ``repo_id`` and
    its pull transfer.
    """
    if kind == "retain":
        return "retain"
    if "control" in (metadata.get("rule") or {}):
        return "control"
    if metadata.get("recut_of"):
        return "recut"
    if metadata.get("reprofile_of"):
        return "reprofiled"
    return "combined" if metadata.get("parents") else "profiled"


def mask_name(metadata: dict[str, Any], task: str | None, *, source: str | None = None) -> str:
    """The unversioned registry name ``<model-slug>/<task>`` for a mask whose :func:`source_of` is ``source``.

    A re-cut given no task is filed under ``<task>.recut``, so it never becomes the latest version
    of the profiled mask's name (which a bare name resolves to); a retain set always under
    ``<task>.retain``, so no mask name ever resolves to one.
    """
    model_ref = (metadata.get("model") or {}).get("ref") or "model"
    if source == "retain":  # always apart from masks; a refresh never becomes the latest of its retain set's name
        suffix = ".retain" + (DERIVED_SUFFIXES["reprofiled"] if metadata.get("reprofile_of") else "")
        return f"{slug(model_ref)}/{check_task(task) if task is not None else default_task(metadata)}{suffix}"
    if task is not None:
        return f"{slug(model_ref)}/{check_task(task)}"
    return f"{slug(model_ref)}/{default_task(metadata)}{DERIVED_SUFFIXES.get(source or '', '')}"


def split_versioned(ref: str) -> tuple[str, int] | None:
    """``name@vN`` (the whole reference, N in ASCII digits) as ``(name, N)``; None for anything else.

    Raises:
        CplError: N is larger than any version can be (SQLite stores at most a 64-bit integer).
    """
    match = _VERSIONED.fullmatch(ref)
    if match is None:
        return None
    digits = match["version"].lstrip("0") or "0"
    if len(digits) > len(str(MAX_VERSION)) or int(digits) > MAX_VERSION:
        shown = digits if len(digits) <= 24 else f"{digits[:20]}... ({len(digits):,} digits)"
        raise CplError(f"mask {match['name'][:200]}@v{shown}: no such version (versions go up to {MAX_VERSION})")
    return match["name"], int(digits)

"""Registry names: ``<model-slug>/<task>@vN``, and how a task name is chosen when none is given."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cpl_masks.errors import CplError

_TASK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_VERSIONED = re.compile(r"^(?P<name>.+)@v(?P<version>\d+)$")
_GENERIC_STEMS = {"inject", "injection", "mastered", "train", "data", "questions", "split"}


def slug(text: str) -> str:
    """Lower-case letters, digits, dots and dashes: ``HuggingFaceTB/SmolLM2-135M`` -> ``smollm2-135m``."""
    last = Path(str(text).rstrip("/")).name or str(text)
    last = last.removesuffix(".gguf")
    cleaned = re.sub(r"[^a-z0-9.]+", "-", last.lower()).strip("-.")
    return cleaned or "model"


def check_task(task: str, option: str = "--name") -> str:
    """Accept a task name made of letters, digits, dots, dashes and underscores."""
    if not _TASK.match(task):
        raise CplError(f"{option} {task!r}: use letters, digits, '.', '-' and '_' only (no '/' or '@')")
    return task


def default_task(metadata: dict[str, Any]) -> str:
    """A task name from provenance: its ``task``, else its injection file's name, else ``default``."""
    if isinstance(metadata.get("task"), str) and _TASK.match(metadata["task"]):
        return metadata["task"]
    inject = (metadata.get("data") or {}).get("inject") or {}
    source = inject.get("path") or inject.get("source") if isinstance(inject, dict) else None
    if isinstance(source, str) and source:
        path = Path(source)
        for candidate in (path.stem, path.parent.name):
            name = slug(candidate)
            if name and name not in _GENERIC_STEMS and name != "model":
                return name
    return "default"


def mask_name(metadata: dict[str, Any], task: str | None) -> str:
    """The unversioned registry name ``<model-slug>/<task>`` for a mask."""
    model_ref = (metadata.get("model") or {}).get("ref") or "model"
    return f"{slug(model_ref)}/{check_task(task) if task is not None else default_task(metadata)}"


def split_versioned(ref: str) -> tuple[str, int] | None:
    """``name@vN`` as ``(name, N)``; None for anything else."""
    match = _VERSIONED.match(ref)
    return (match["name"], int(match["version"])) if match else None

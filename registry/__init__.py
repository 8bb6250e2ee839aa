"""The mask registry: where every mask came from and every task it was reused on.

An SQLite database and a content-addressed file store in ``$CPL_MASKS_HOME``. Masks get names
``<model-slug>/<task>@vN``; anywhere a mask is taken it can be named by a file path, an id or a
unique id prefix, ``name@vN`` or ``name`` (its latest version).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cpl_masks.registry.catalog import (
    Health,
    Transfer,
    add_mask,
    add_run,
    add_transfer,
    collect_garbage,
    lineage,
    list_masks,
    remove,
    resolve,
    show,
    source_of,
    verify,
)

__all__ = [
    "Health",
    "Transfer",
    "add_transfer",
    "collect_garbage",
    "lineage",
    "list_masks",
    "record_run",
    "register_mask",
    "remove",
    "resolve_mask_path",
    "show",
    "source_of",
    "verify",
]


def resolve_mask_path(ref: str) -> Path:
    """A mask file for ``ref``: a file path, an id or unique id prefix, ``name@vN`` or ``name``.

    Raises:
        CplError: the reference names nothing, matches several ids, or its stored file is gone.
    """
    return resolve(ref)


def register_mask(path: Path, *, task: str | None = None, source: str = "profiled", **details: Any) -> str:
    """Register a saved mask file under ``<model-slug>/<task>`` with the next version; returns ``name@vN``.

    ``details`` may carry ``parents`` (ids of the masks a combined mask came from), ``repo_id`` and
    ``revision`` (where a pulled mask came from) and ``transfer`` (a :class:`Transfer` recorded in the
    same transaction). Registering an already registered mask returns its existing name.
    """
    return add_mask(Path(path), task=task, source=source, **details)


def record_run(mask_path: Path, run: dict[str, Any]) -> None:
    """Record a training run that used a mask (``run`` is the train command's run.json payload).

    Missing keys are stored as unknown; a mask file that is not registered yet is registered first.
    """
    add_run(Path(mask_path), run)

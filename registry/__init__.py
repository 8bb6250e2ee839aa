"""The mask registry: where every mask came from and every task it was reused on.

TEMPORARY INTERFACE (the registry helper replaces the bodies, keeping these signatures).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cpl_masks.errors import CplError


def resolve_mask_path(ref: str) -> Path:
    """A mask file for ``ref``: a file path, an id or unique id prefix, ``name@vN`` or ``name``."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    raise CplError(f"mask {ref}: no such file or registered mask")


def register_mask(path: Path, *, task: str | None = None, source: str = "profiled", **details: Any) -> str | None:
    """Register a saved mask file; returns its ``name@vN``."""
    return None


def record_run(mask_path: Path, run: dict[str, Any]) -> None:
    """Record a training run that used a mask (``run`` is the run.json payload)."""
    return None

"""The content-addressed artifact store: one mask file per content id, beside the database.

Files are copied to a temporary name inside the store first (the slow part, done without any
lock) and renamed onto ``<id[:2]>/<id>.safetensors`` by the registering transaction, so a file only
becomes visible together with its row. A crash in between leaves an orphan file that
:func:`cpl_masks.registry.catalog.collect_garbage` removes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cpl_masks.files import home_dir

STORE_NAME = "masks"
SUFFIX = ".safetensors"
TEMP_PREFIX = ".incoming-"


def store_dir() -> Path:
    """The store folder: ``$CPL_MASKS_HOME/masks``."""
    return home_dir() / STORE_NAME


def artifact_path(mask_id: str) -> Path:
    """Where the mask with this content id lives in the store."""
    return store_dir() / mask_id[:2] / f"{mask_id}{SUFFIX}"


@contextlib.contextmanager
def staged_copy(source: Path) -> Iterator[Path]:
    """A fsynced copy of ``source`` inside the store, removed on exit unless it was renamed away."""
    folder = store_dir()
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=SUFFIX, dir=folder)
    staged = Path(name)
    try:
        with os.fdopen(fd, "wb") as target, open(source, "rb") as origin:
            shutil.copyfileobj(origin, target, 1 << 20)
            target.flush()
            os.fsync(target.fileno())
        yield staged
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()


def place(staged: Path, mask_id: str) -> Path:
    """Rename a staged copy onto its content-addressed path (atomic within the store's filesystem)."""
    target = artifact_path(mask_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, target)
    return target


def stored_ids() -> set[str]:
    """Content ids of every file in the store."""
    folder = store_dir()
    return {path.name.removesuffix(SUFFIX) for path in folder.glob(f"??/*{SUFFIX}")} if folder.is_dir() else set()


def staged_leftovers() -> list[Path]:
    """Temporary copies left behind by processes that died while copying."""
    folder = store_dir()
    return sorted(folder.glob(f"{TEMP_PREFIX}*")) if folder.is_dir() else []

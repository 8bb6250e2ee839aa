"""The content-addressed store: one mask file (a freeze mask or a retain set) per content id, beside the database.

Files are written to a temporary name inside the store first (the slow part, done without any
lock) and renamed onto ``<id[:2]>/<id>.safetensors`` by the registering transaction, so a file only
becomes visible together with its row. A crash in between leaves an orphan file that
:meth:`cpl_masks.registry.Registry.collect_garbage` finds.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cpl_masks.masks.format import Mask
from cpl_masks.utils.files import default_file_mode, disk_error

STORE_NAME = "masks"
SUFFIX = ".safetensors"
TEMP_PREFIX = ".incoming-"
_CONTENT_ID = re.compile(r"^[0-9a-f]{64}$")


class Store:
    """The store folder and where each content id lives in it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path_of(self, mask_id: str) -> Path:
        """Where the mask with this content id lives in the store."""
        return self.folder / mask_id[:2] / f"{mask_id}{SUFFIX}"

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh temporary file name inside the store, removed on exit unless it was renamed away."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=SUFFIX, dir=self.folder)
        os.fchmod(fd, default_file_mode())  # the user's umask, not mkstemp's 0o600
        os.close(fd)
        staged = Path(name)
        try:
            yield staged
        finally:
            staged.unlink(missing_ok=True)

    @contextlib.contextmanager
    def staged_copy(self, source: Path) -> Iterator[Path]:
        """A fsynced copy of the file ``source`` inside the store (see :meth:`staging`)."""
        with self.staging() as staged:
            try:
                with open(staged, "wb") as target, open(source, "rb") as origin:
                    shutil.copyfileobj(origin, target, 1 << 20)
                    target.flush()
                    os.fsync(target.fileno())
            except OSError as error:
                converted = disk_error(error, staged)
                if converted is error:
                    raise
                raise converted from error
            yield staged

    @contextlib.contextmanager
    def staged_mask(self, mask: Mask) -> Iterator[Path]:
        """``mask`` saved straight into the store's staging file (no copy of a temporary file)."""
        with self.staging() as staged:
            mask.save(staged)
            yield staged

    def place(self, staged: Path, mask_id: str) -> Path:
        """Rename a staged file onto its content-addressed path (atomic within the store's filesystem)."""
        target = self.path_of(mask_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)
        return target

    def files(self) -> list[Path]:
        """Every file in the store except the staged copies at its top level."""
        if not self.folder.is_dir():
            return []
        return sorted(
            path
            for path in self.folder.rglob("*")
            if path.is_file() and not (path.parent == self.folder and path.name.startswith(TEMP_PREFIX))
        )

    def placed_id(self, path: Path) -> str | None:
        """The content id a store file's name claims, when it sits where that id belongs; else None."""
        claimed = path.name.removesuffix(SUFFIX)
        return claimed if _CONTENT_ID.match(claimed) and path == self.path_of(claimed) else None

    def staged_leftovers(self) -> list[Path]:
        """Temporary copies left behind by processes that died while copying."""
        return sorted(self.folder.glob(f"{TEMP_PREFIX}*")) if self.folder.is_dir() else []

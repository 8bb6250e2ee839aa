"""The content-addressed store: one mask file (a freeze mask or a retain set) per content id, beside the database.

Files are written to a temporary name at the store's top level first (the slow part, done without
the database lock) and renamed onto ``<id[:2]>/<id>.safetensors`` by the registering transaction, so
a file only becomes visible together with its row. Every registration holds a shared OS lock
(``flock``) on the store folder from before its staged file exists until after it is gone; a
``gc`` sweeps staged files only under the exclusive lock, when no registration is live, so it
removes those of dead processes (``kill -9``) at once and never one a live process is writing. A
crash between the rename and the commit leaves an orphan store file, which it finds too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cpl_masks.masks.format import Mask
from cpl_masks.utils.files import default_file_mode, disk_error, sha256_file

STORE_NAME = "masks"
SUFFIX = ".safetensors"
TEMP_PREFIX = ".incoming-"
_CONTENT_ID = re.compile(r"^[0-9a-f]{64}$")


def is_staging(name: str) -> bool:
    """Whether a top-level store entry is a registration's: its staged file ``.incoming-*``, or the
    ``..incoming-*.tmp`` that saving a mask into it writes first (then renames onto it)."""
    return name.startswith((TEMP_PREFIX, f".{TEMP_PREFIX}"))


@dataclass(frozen=True)
class Staged:
    """A file staged in the store, with the sha256 and size of the very bytes written there."""

    path: Path
    sha256: str
    size: int


class _HashingWriter:
    """A binary file that hashes every byte written through it, so a copy is hashed in the one read it makes."""

    def __init__(self, target: BinaryIO) -> None:
        self.target = target
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.target.write(data)


class Store:
    """The store folder and where each content id lives in it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path_of(self, mask_id: str) -> Path:
        """Where the mask with this content id lives in the store."""
        return self.folder / mask_id[:2] / f"{mask_id}{SUFFIX}"

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh temporary file name inside the store, removed on exit unless it was renamed away.

        The store's shared lock is held for the block, so no ``gc`` sweeps it (or the temporary file
        saving a mask there makes beside it) meanwhile.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        with _store_lock(self.folder, fcntl.LOCK_SH):  # waits only while a gc removes dead staged files
            fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=SUFFIX, dir=self.folder)
            os.fchmod(fd, default_file_mode())  # the user's umask, not mkstemp's 0o600
            os.close(fd)
            staged = Path(name)
            try:
                yield staged
            finally:
                staged.unlink(missing_ok=True)

    @contextlib.contextmanager
    def staged_copy(self, source: Path) -> Iterator[Staged]:
        """A fsynced copy of the file ``source`` inside the store, hashed as it is copied (see :meth:`staging`).

        The copy is read once: the sha256 is of the bytes written, whatever ``source`` holds afterwards.

        Raises:
            CplError: the disk is full (any other ``OSError``, an unreadable ``source``, as it is).
        """
        with self.staging() as staged:
            try:
                with open(staged, "wb") as target, open(source, "rb") as origin:
                    writer = _HashingWriter(target)
                    shutil.copyfileobj(origin, writer, 1 << 20)
                    target.flush()
                    os.fsync(target.fileno())
            except OSError as error:
                converted = disk_error(error, staged)
                if converted is error:
                    raise
                raise converted from error
            yield Staged(staged, writer.digest.hexdigest(), writer.size)

    @contextlib.contextmanager
    def staged_mask(self, mask: Mask) -> Iterator[Staged]:
        """``mask`` saved straight into the store's staging file (no copy of a temporary file), then hashed."""
        with self.staging() as staged:
            mask.save(staged)
            yield Staged(staged, sha256_file(staged), staged.stat().st_size)

    def place(self, staged: Path, mask_id: str) -> Path:
        """Rename a staged file onto its content-addressed path (atomic within the store's filesystem)."""
        target = self.path_of(mask_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)
        return target

    def files(self) -> list[Path]:
        """Every file in the store except what registrations stage (:func:`is_staging`) and whatever is in it."""
        if not self.folder.is_dir():
            return []
        return sorted(
            path
            for path in self.folder.rglob("*")
            if path.is_file() and not is_staging(path.relative_to(self.folder).parts[0])
        )

    def placed_id(self, path: Path) -> str | None:
        """The content id a store file's name claims, when it sits where that id belongs; else None."""
        claimed = path.name.removesuffix(SUFFIX)
        return claimed if _CONTENT_ID.match(claimed) and path == self.path_of(claimed) else None

    def staging_entries(self) -> list[Path]:
        """Every file staged at the store's top level (:func:`is_staging`), live or abandoned."""
        if not self.folder.is_dir():
            return []
        return sorted(path for path in self.folder.iterdir() if is_staging(path.name))

    def staged_leftovers(self) -> list[Path]:
        """Staged files no live process holds (their process died); none known while a registration runs."""
        with _store_lock(self.folder, fcntl.LOCK_EX | fcntl.LOCK_NB) as quiet:
            return self.staging_entries() if quiet else []

    def discard_abandoned(self) -> list[Path]:
        """Remove the staged files no live process holds (see :meth:`staged_leftovers`); return what went.

        While a registration runs nothing is swept: its files cannot be told from a dead one's.
        """
        with _store_lock(self.folder, fcntl.LOCK_EX | fcntl.LOCK_NB) as quiet:
            if not quiet:
                return []
            entries = self.staging_entries()
            for path in entries:
                _remove_entry(path)
            return entries


@contextlib.contextmanager
def _store_lock(folder: Path, operation: int) -> Iterator[bool]:
    """An OS lock on the store folder for the block; False inside when ``LOCK_NB`` found it taken.

    Registrations share it (``LOCK_SH``); a sweep of staged files takes it alone (``LOCK_EX``). A
    store folder that does not exist holds nothing: True. Where the filesystem has no locks, a
    registration goes on and a sweep finds it taken.
    """
    try:
        fd = os.open(folder, os.O_RDONLY)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, operation)
            locked = True
        except BlockingIOError:
            locked = False
        except OSError:  # a filesystem without locks: registrations go on, a sweep cannot tell live from dead
            locked = not operation & fcntl.LOCK_EX
        yield locked
    finally:
        os.close(fd)


def _remove_entry(path: Path) -> None:
    """Delete a staged entry: a file or link, or a folder with what it holds."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)

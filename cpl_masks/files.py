"""Atomic file writes, content hashes and output folders.

Every artifact the tool writes goes to a temporary file in the destination folder first and is
renamed into place, so a crash or a bad input never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from cpl_masks.errors import CplError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing and rename it over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write ``payload`` as indented, key-sorted JSON, atomically."""
    with atomic_write(path) as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, ensure_ascii=False)
        handle.write("\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write one JSON object per line, atomically."""
    with atomic_write(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def check_output_dir(path: str | os.PathLike, *, overwrite: bool, option: str = "--out") -> Path:
    """Refuse a file, or a non-empty folder unless ``overwrite`` is set, as an output folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CplError(f"{option} {path}: exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CplError(f"{option} {path}: folder is not empty; pass --overwrite to write into it")
    return path


def prepare_output_dir(path: str | os.PathLike, *, overwrite: bool, option: str = "--out") -> Path:
    """Create an output folder after :func:`check_output_dir` accepts it."""
    path = check_output_dir(path, overwrite=overwrite, option=option)
    path.mkdir(parents=True, exist_ok=True)
    return path


def home_dir() -> Path:
    """The tool's own folder: ``$CPL_MASKS_HOME``, else the user cache folder (``~/.cache/cpl-masks``)."""
    configured = os.environ.get("CPL_MASKS_HOME")
    if configured:
        return Path(configured).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("cpl-masks", appauthor=False))


def check_output_file(
    path: str | os.PathLike,
    *,
    overwrite: bool,
    inputs: Iterable[str | os.PathLike | None] = (),
    option: str = "--out",
) -> Path:
    """Refuse an output file that would destroy something, before any expensive work starts.

    An existing file needs ``overwrite``; a command's own input (a mask, a question file) is refused
    even then; a folder that cannot be created or written is refused too.
    """
    path = Path(path)
    if path.is_dir():
        raise CplError(f"{option} {path}: is a folder; give a file name")
    for source in inputs:
        if source is not None and path.exists() and Path(source).exists() and os.path.samefile(path, source):
            raise CplError(f"{option} {path}: is this command's input {source}; write to another file")
    if path.exists() and not overwrite:
        raise CplError(f"{option} {path}: file exists; pass --overwrite to replace it")
    check_writable_folder(path.absolute().parent, what=f"{option} {path}")
    return path


def check_writable_folder(folder: str | os.PathLike, *, what: str) -> None:
    """Refuse a folder that cannot be created (a file is in the way) or written, naming ``what`` needs it.

    Looks at ``folder`` or, when it does not exist yet, its closest existing ancestor.
    """
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CplError(f"{what}: cannot be created, {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CplError(f"{what}: cannot write in {existing} (permission denied)")

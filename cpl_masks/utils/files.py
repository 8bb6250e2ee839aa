"""Atomic file writes, content hashes, output checks and folder locks.

Every file the tool writes goes to a temporary file in the destination folder first and is
renamed into place, so a crash or a bad input never leaves a half-written file behind; without
``--overwrite`` it is linked into place instead, which never replaces a file. Outputs are checked
before any expensive work: never over an input, never in the registry's home. A folder a process
writes can be locked (:func:`lock_folder`) so a second writer is refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from cpl_masks.errors import CplError

LOCK_NAME = ".lock"  # the lock file lock_folder keeps in a folder a process is writing


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, replace: bool = True) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing and publish it as ``path`` on success.

    The file gets the mode a plain ``open`` would give (``0o666`` less the umask), not the
    temporary file's ``0o600``. With ``replace`` False the file is published by a hard link, which
    fails when ``path`` exists: a file someone created after the command's checks (a run that
    began before it was there) is never replaced without ``--overwrite``.

    Raises:
        CplError: ``replace`` is False and ``path`` appeared meanwhile, or the disk is full.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_file_mode())
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _publish_new(Path(tmp), path)
    except OSError as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        converted = disk_error(error, path)
        if converted is error:
            raise
        raise converted from error
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _publish_new(tmp: Path, path: Path) -> None:
    """Give ``tmp`` the name ``path`` only if nothing has it yet (a hard link cannot replace a file)."""
    try:
        try:
            os.link(tmp, path)
        except OSError as error:  # a filesystem without hard links: claim the name exclusively, then fill it
            if isinstance(error, FileExistsError) or error.errno not in _NO_HARD_LINKS:
                raise
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, default_file_mode()))
            os.replace(tmp, path)
            return
    except FileExistsError:
        raise CplError(
            f"{path}: appeared while this command ran; not replaced (pass --overwrite to replace it)"
        ) from None
    os.unlink(tmp)


_NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK)


def default_file_mode() -> int:
    """The mode ``open`` gives a new file: ``0o666`` less the process's umask (``0o644`` usually)."""
    # Linux says it without changing it
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/self/status", encoding="ascii") as status:
        return 0o666 & ~int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_DISK_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the filesystem",
    errno.EROFS: "read-only filesystem",
    errno.EIO: "input/output error",
}


def describe_os_error(error: OSError) -> str:
    """An ``OSError`` as one line: the file it names and what went wrong, a full disk said plainly."""
    reason = _DISK_ERRORS.get(error.errno or 0) or error.strerror or str(error) or type(error).__name__
    return f"{error.filename}: {reason}" if error.filename else reason


def disk_error(error: OSError, path: str | os.PathLike) -> Exception:
    """A write that failed for lack of room (full disk, quota) or a broken disk, as one line naming ``path``.

    Any other ``OSError`` is returned as it is.
    """
    reason = _DISK_ERRORS.get(error.errno or 0)
    if reason is None:
        return error
    return CplError(f"{path}: cannot write ({reason}); nothing was replaced")


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write ``payload`` as indented, key-sorted JSON, atomically."""
    with atomic_write(path) as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, ensure_ascii=False)
        handle.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in the file at ``path``; a file that is not JSON (or not UTF-8) is refused in one line naming it.

    Raises:
        CplError: the file is not valid JSON.
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CplError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from error
    except UnicodeDecodeError as error:
        raise CplError(f"{path}: not valid JSON (not UTF-8 text)") from error


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


def check_output_dir(
    path: str | os.PathLike,
    *,
    overwrite: bool,
    option: str = "--out",
    inputs: Iterable[str | os.PathLike | None] = (),
    writes: Iterable[str] | None = None,
) -> Path:
    """Refuse an output folder that would destroy something, before any expensive work starts.

    A file, or a non-empty folder unless ``overwrite`` is set; a folder in the registry's home
    (:func:`check_outside_registry`); and, even with ``overwrite``, one that would write over an
    input: with ``writes`` (the file names the command writes there) an input that is one of
    those files, without it any input inside the folder or a folder that is, or lies in, an
    input folder (a model folder given as ``--out``).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CplError(f"{option} {path}: exists and is not a folder")
    check_outside_registry(path, option)
    for source in (Path(item) for item in inputs if item is not None):
        if writes is not None:
            clash = next((path / name for name in writes if _same_file(path / name, source)), None)
            if clash is not None:
                raise CplError(f"{option} {path}: would write {clash.name} over this command's input {source}")
        elif source.exists() and (_inside(source, path) or (source.is_dir() and _inside(path, source))):
            raise CplError(f"{option} {path}: holds or is this command's input {source}; write to another folder")
    if path.is_dir() and any(child.name != LOCK_NAME for child in path.iterdir()) and not overwrite:
        raise CplError(f"{option} {path}: folder is not empty; pass --overwrite to write into it")
    return path


def prepare_output_dir(path: str | os.PathLike, *, overwrite: bool, option: str = "--out") -> Path:
    """Create an output folder after :func:`check_output_dir` accepts it."""
    path = check_output_dir(path, overwrite=overwrite, option=option)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _same_file(first: Path, second: Path) -> bool:
    return first.exists() and second.exists() and os.path.samefile(first, second)


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies in it, links resolved."""
    return path.resolve() == folder.resolve() or folder.resolve() in path.resolve().parents


def check_outside_registry(path: str | os.PathLike, option: str = "--out") -> None:
    """Refuse an output in the registry's home: only the registry writes its database and store there."""
    home = home_dir()
    if _inside(Path(path), home):
        raise CplError(
            f"{option} {path}: lies in the registry's folder {home}; only the registry writes there (write elsewhere)"
        )


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
    even then, and so is a file in the registry's home; a folder that cannot be created or written
    is refused too. Plots are output files like any other. Write the file with
    ``atomic_write(path, replace=overwrite)``, so one created after this check is not replaced.
    """
    path = Path(path)
    if path.is_dir():
        raise CplError(f"{option} {path}: is a folder; give a file name")
    check_outside_registry(path, option)
    for source in inputs:
        if source is not None and _same_file(path, Path(source)):
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


def folder_in_use(path: str | os.PathLike) -> bool:
    """Whether a live process holds the folder's lock (:func:`lock_folder`) right now."""
    return folder_holder(path) is not None


def folder_holder(path: str | os.PathLike) -> str | None:
    """The pid of the live process holding the folder's lock (:func:`lock_folder`) right now, or None."""
    lock_path = Path(path) / LOCK_NAME
    if not lock_path.is_file():
        return None
    fd = os.open(lock_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _owner(fd)
    finally:
        os.close(fd)  # releases the probe's lock, if it got it
    return None


def _owner(fd: int) -> str:
    """The pid a lock file holds (written by its holder), or "unknown"."""
    return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"


class FolderBusy(CplError):
    """Another live process holds the folder's lock."""


@contextlib.contextmanager
def lock_folder(
    path: str | os.PathLike, *, what: str = "run folder", wait: Callable[[str], None] | None = None
) -> Iterator[Path]:
    """Hold an exclusive lock on a folder while this process writes it; a second writer is refused, or waits.

    An OS file lock (``flock`` on ``<folder>/.lock``, which holds the owner's pid) dies with its
    process, so a killed run never leaves a stale lock behind. Creates the folder if needed. With
    ``wait``, a held lock is waited for instead, after ``wait`` is told the holder's pid.

    Raises:
        FolderBusy: another live process holds the lock (its pid is named), unless waiting.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, default_file_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            if wait is None:
                raise FolderBusy(
                    f"{folder}: another process (pid {owner}) is writing this {what}; wait for it or stop it first"
                ) from None
            wait(owner)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield folder
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a waiting locker)

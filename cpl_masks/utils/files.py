"""Atomic file writes, content hashes, output checks and folder locks.

Every file the tool writes goes to a temporary file in the destination folder first and is
renamed into place, so a crash or a bad input never leaves a half-written file behind; without
``--overwrite`` it is linked into place instead, which never replaces a file. Outputs are checked
before any expensive work: never over an input, never in the registry's home, never in a model's
folder. A folder a process writes can be locked (:func:`lock_folder`) so a second writer is refused;
a lock file is never followed through a link nor rewritten unless it is one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from cpl_masks.errors import CplError

LOCK_NAME = ".lock"  # the lock file lock_folder keeps in a folder a process is writing
_LOCK_TEXT = re.compile(rb"\s*\d{0,20}\s*")  # what a lock file holds: its holder's pid, or nothing yet
MODEL_CONFIGS = ("config.json", "adapter_config.json")  # with one of MODEL_FILES: a model's folder
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
MODEL_FILES += ("adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


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

    A file, or a non-empty folder unless ``overwrite`` is set (a lock file of ours alone leaves it
    empty, :func:`folder_is_empty`); a folder in the registry's home (:func:`check_outside_registry`)
    or in a model's folder (:func:`check_outside_model`); and, even with ``overwrite``, one that would
    write over an input: one that is or lies in an input folder, and with ``writes`` (the file names
    the command writes there) an input that is one of those files, without it any input inside the folder.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CplError(f"{option} {path}: exists and is not a folder")
    check_outside_registry(path, option)
    for source in _existing(inputs):
        if writes is None and (_inside(source, path) or (source.is_dir() and _inside(path, source))):
            raise CplError(f"{option} {path}: holds or is this command's input {source}; write to another folder")
        _refuse_input_folder(path, source, option)
        clash = next((path / name for name in writes or () if _same_file(path / name, source)), None)
        if clash is not None:
            raise CplError(f"{option} {path}: would write {clash.name} over this command's input {source}")
    check_outside_model(path, option)
    if path.is_dir() and not overwrite and not folder_is_empty(path):
        raise CplError(f"{option} {path}: folder is not empty; pass --overwrite to write into it")
    return path


def folder_is_empty(path: str | os.PathLike) -> bool:
    """Whether a folder holds nothing but, at most, a lock file of ours (a stale one included); a ``.lock``
    that is a link, a folder, a hard-linked file or other data is something else (:func:`lock_folder` refuses it)."""
    return all(child.name == LOCK_NAME and _is_lock_file(child) for child in Path(path).iterdir())


def prepare_output_dir(path: str | os.PathLike, *, overwrite: bool, option: str = "--out") -> Path:
    """Create an output folder after :func:`check_output_dir` accepts it."""
    check_output_dir(path, overwrite=overwrite, option=option).mkdir(parents=True, exist_ok=True)
    return Path(path)


def _same_file(first: Path, second: Path) -> bool:
    return first.exists() and second.exists() and os.path.samefile(first, second)


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies in it, links resolved."""
    return path.resolve() == folder.resolve() or folder.resolve() in path.resolve().parents


def _existing(inputs: Iterable[str | os.PathLike | None]) -> Iterator[Path]:
    """The inputs that are on this disk (a hub id or ``builtin:demo`` is not)."""
    return (Path(item) for item in inputs if item is not None and Path(item).exists())


def _refuse_input_folder(path: Path, source: Path, option: str) -> None:
    """Refuse an output that is or lies in an input folder (a model or dataset folder): nothing writes there."""
    if source.is_dir() and _inside(path, source):
        folder = "the model folder" if is_model_folder(source) else "this command's input folder"
        raise CplError(f"{option} {path}: lies in {folder} {source}; nothing writes there (write elsewhere)")


def is_model_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a model: a config and weights or a tokenizer, what ``from_pretrained`` reads."""
    folder = Path(folder)
    config = any((folder / name).is_file() for name in MODEL_CONFIGS)
    return config and any((folder / name).exists() for name in MODEL_FILES)


def model_folder_of(path: str | os.PathLike) -> Path | None:
    """The model folder ``path`` is or lies in (as given, then with links resolved), else None."""
    given = Path(path).absolute()
    for folder in (given, *given.parents, *(resolved := given.resolve(), *resolved.parents)):
        if folder.is_dir() and is_model_folder(folder):
            return folder
    return None


def check_outside_model(path: str | os.PathLike, option: str = "--out") -> None:
    """Refuse an output that is or lies in any model's folder (:func:`is_model_folder`), even with ``--overwrite``.

    The model a command names is also among its inputs (``models.model_locations``): a GGUF file, its cache.
    """
    folder = model_folder_of(path)
    if folder is not None:
        raise CplError(f"{option} {path}: lies in the model folder {folder}; nothing writes there (write elsewhere)")


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
    even then, and so is a file in an input folder, the registry's home or a model's folder, or in a
    folder that cannot be created or written. Plots are output files like any other. Write the file
    with ``atomic_write(path, replace=overwrite)``, so one created after this check is not replaced.
    """
    path = Path(path)
    if path.is_dir():
        raise CplError(f"{option} {path}: is a folder; give a file name")
    check_outside_registry(path, option)
    for source in _existing(inputs):
        if _same_file(path, source):
            raise CplError(f"{option} {path}: is this command's input {source}; write to another file")
        _refuse_input_folder(path, source, option)
    check_outside_model(path, option)
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
    """The pid of the live process holding the folder's lock (:func:`lock_folder`) right now, or None.

    The probe never follows a link nor waits on a fifo: a ``.lock`` that is not a lock file is held
    by no one (:func:`lock_folder` then refuses it).
    """
    with _lock_file(Path(path) / LOCK_NAME) as fd:
        if fd is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _owner(fd)
    return None  # closing the file released the probe's lock


_NO_FOLLOW = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # never through a link, never waiting on a fifo


@contextlib.contextmanager
def _lock_file(path: Path) -> Iterator[int | None]:
    """``path`` itself (never what a link names) open for reading, or None: absent, or not a lock file."""
    try:
        fd = os.open(path, os.O_RDONLY | _NO_FOLLOW)
    except OSError:
        yield None
        return
    try:
        yield fd if _holds_a_lock(fd) else None
    finally:
        os.close(fd)


def _holds_a_lock(fd: int) -> bool:
    """Whether the open file is a lock file: a regular file with no other name, holding at most a pid."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_size > 64:
        return False
    return _LOCK_TEXT.fullmatch(os.pread(fd, 65, 0)) is not None


def _is_lock_file(path: Path) -> bool:
    """Whether ``path`` itself (not what a link names) is a lock file (:func:`_holds_a_lock`)."""
    with _lock_file(path) as fd:
        return fd is not None


def _open_lock(path: Path) -> int:
    """Open a folder's lock file for writing: created here, or one that is a lock file; never through a link.

    Raises:
        CplError: ``path`` is a link, a folder, a fifo, a file with another name (a hard link) or a
            file holding something other than a pid; it is left as it is.
    """
    flags = os.O_RDWR | _NO_FOLLOW
    for _ in range(3):  # a stale lock removed between the two opens is created on the next try
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL, default_file_mode())
        except FileExistsError:
            pass
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            continue
        except OSError as error:  # a link (ELOOP), a folder (EISDIR), ...
            raise _not_a_lock(path) from error
        if _holds_a_lock(fd):
            return fd
        os.close(fd)
        break
    raise _not_a_lock(path)


def _not_a_lock(path: Path) -> CplError:
    return CplError(
        f"{path}: not a lock file (a link, a folder, a fifo, a hard-linked file or other data); nothing was written "
        f"through it: remove it if no cpl-masks process is using {path.parent}"
    )


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
    ``wait``, a held lock is waited for instead, after ``wait`` is told the holder's pid. The lock
    file is opened without following a link and rewritten only when it is one (:func:`_open_lock`).

    Raises:
        FolderBusy: another live process holds the lock (its pid is named), unless waiting.
        CplError: the folder's ``.lock`` is not a lock file.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    fd = _open_lock(folder / LOCK_NAME)
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

"""Keeping the registry sound: verify its files, remove masks, hold masks in use and collect garbage.

:class:`Maintenance` is mixed into :class:`~cpl_masks.registry.catalog.Registry`, which supplies
the database and the store; registering, resolving and reading stay there. Removing a mask takes an
exclusive OS lock on its stored file, which a running command's shared lock (:meth:`Maintenance.hold`)
refuses, so no mask disappears under a training run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cpl_masks.errors import CplError
from cpl_masks.masks.format import Mask
from cpl_masks.registry.queries import alias_row, find, label, names_of, refuse_bare_name, relatives
from cpl_masks.registry.schema import connect, transaction
from cpl_masks.registry.store import Store
from cpl_masks.utils.files import sha256_file


@dataclass
class StrayFile:
    """A file in the store that no registered mask accounts for."""

    path: Path
    problem: str  # why it is stray: not registered, misplaced, misnamed
    mask_id: str | None  # its content id when it reads as a valid mask (gc keeps those without --force)


@dataclass
class Health:
    """What :meth:`Maintenance.verify` and :meth:`Maintenance.collect_garbage` found, removed or kept."""

    checked: int = 0
    missing: list[str] = field(default_factory=list)  # "name@vN (id)" whose file is gone
    corrupt: list[str] = field(default_factory=list)  # "name@vN (id)" whose bytes changed or are not that id
    strays: list[StrayFile] = field(default_factory=list)  # store files without a row, or not where they belong
    leftovers: list[str] = field(default_factory=list)  # staged registrations no live process holds
    removed: list[str] = field(default_factory=list)  # paths gc deleted
    kept: list[StrayFile] = field(default_factory=list)  # valid masks gc left in place (no --force)

    @property
    def ok(self) -> bool:
        """True when every registered mask's file is present and intact."""
        return not (self.missing or self.corrupt)


@dataclass
class Removal:
    """What :meth:`Maintenance.remove` deleted and what it left on record."""

    ref: str  # name@vN of the removed mask (or alias)
    mask_id: str
    path: Path | None  # its stored file, now deleted (None when only an alias went)
    runs: int  # recorded runs that stay, showing the removed mask's name
    children: list[str]  # masks combined or re-cut from it, which stay
    transfers: int  # Hub transfers recorded with it, deleted with its row
    aliases: list[str] = field(default_factory=list)  # its other names, removed with it
    alias_of: str | None = None  # when only an alias was removed: the mask it named, which stays


class Maintenance:
    """The registry's upkeep, mixed into :class:`~cpl_masks.registry.catalog.Registry`.

    Kept apart from registering and reading: these methods check, lock and delete store files
    rather than file new masks. They need only the database file and the store the Registry sets.
    """

    database: Path
    store: Store

    def verify(self) -> Health:
        """Re-hash every registered mask's file; list missing and corrupt ones, stray store files and
        abandoned staged registrations.

        A file is intact when its bytes hash to the sha256 recorded at registration and its bits are
        the registered content id: a recorded hash taken of other bytes than the id's (a file swapped
        while an older release registered it) is found too.
        """
        health = Health()
        with connect(self.database) as connection:
            rows = connection.execute("SELECT id, name, version, sha256 FROM masks ORDER BY name, version").fetchall()
        for row in rows:
            health.checked += 1
            path = self.store.path_of(row["id"])
            if not path.is_file():
                health.missing.append(f"{label(row)} ({row['id'][:12]})")
            elif sha256_file(path) != row["sha256"] or _content_id(path) != row["id"]:
                health.corrupt.append(f"{label(row)} ({row['id'][:12]})")
        health.strays = self._strays({row["id"] for row in rows})
        health.leftovers = [str(path) for path in self.store.staged_leftovers()]
        return health

    def _strays(self, registered: set[str]) -> list[StrayFile]:
        """Store files that are not a registered mask's file at its content-addressed path."""
        strays = []
        for path in self.store.files():
            placed = self.store.placed_id(path)
            if placed in registered:
                continue
            content_id = _content_id(path)
            if placed is None:
                problem = "misplaced: not at <id[:2]>/<id>.safetensors, where a content id belongs"
            elif content_id is not None and content_id != placed:
                problem = f"misnamed: its content id is {content_id[:12]}, not the id in its file name"
            else:
                problem = "not registered"
            strays.append(StrayFile(path, problem, content_id))
        return strays

    def remove(self, ref: str, *, force: bool = False) -> Removal:
        """Delete one version of a mask and its stored file; its recorded runs stay, naming it.

        Removing an alias's ``name@vN`` removes only that name; removing the mask removes its aliases.

        Raises:
            CplError: ``ref`` is a bare name (give ``name@vN`` or an id); a running command holds
                the mask (:meth:`hold`), even with ``force``; or, without ``force``, recorded runs or
                registered children reference the mask.
        """
        with contextlib.ExitStack() as stack:  # the lock on the file is held until after its unlink
            with connect(self.database) as connection, transaction(connection):
                refuse_bare_name(connection, ref)
                row = find(connection, ref)
                alias = alias_row(connection, ref)
                if alias is not None:
                    connection.execute(
                        "DELETE FROM aliases WHERE name = ? AND version = ?", (alias["name"], alias["version"])
                    )
                    return Removal(label(alias), row["id"], None, 0, [], 0, alias_of=label(row))
                runs = connection.execute("SELECT COUNT(*) FROM runs WHERE mask_id = ?", (row["id"],)).fetchone()[0]
                children = [child["ref"] for child in relatives(connection, row["id"], up=False)]
                if (runs or children) and not force:
                    held = _references(label(row), runs, children)
                    raise CplError(f"registry rm {ref}: {held}; pass --force to remove it (its runs stay on record)")
                transfers = connection.execute("SELECT COUNT(*) FROM transfers WHERE mask_id = ?", (row["id"],))
                path = self.store.path_of(row["id"])
                in_use = f"registry rm {ref}: a running command (train, sweep) is using this mask"
                stack.enter_context(_flocked(path, fcntl.LOCK_EX, f"{in_use}; wait for it to finish or stop it"))
                aliases = names_of(connection, row["id"])[1:]
                removal = Removal(label(row), row["id"], path, runs, children, transfers.fetchone()[0], aliases=aliases)
                connection.execute("DELETE FROM masks WHERE id = ?", (row["id"],))  # its aliases go with it
            path.unlink(missing_ok=True)  # a crash before this leaves a stray file for gc
        return removal

    def hold(self, mask_id: str) -> contextlib.AbstractContextManager[None]:
        """Keep a registered mask from being removed while this process uses it (e.g. a training run).

        A shared OS lock on its stored file, so any number of runs may hold it; :meth:`remove`
        refuses a held mask, and the lock dies with the process. A mask not in the store (an
        unregistered file) needs no hold.

        Raises:
            CplError: the mask is being removed right now.
        """
        refusal = f"mask {mask_id[:12]}: another process is removing it from the registry"
        return _flocked(self.store.path_of(mask_id), fcntl.LOCK_SH, refusal)

    def collect_garbage(self, *, force: bool = False) -> Health:
        """Remove stray store files and abandoned staged registrations; report rows whose file is missing.

        A stray file that reads as a valid mask is kept (in ``kept``) unless ``force``: it may be
        the only copy of a mask whose row was lost. Staged registrations are removed only when no
        live registration holds the store's lock, with or without ``force``, so a registration
        running beside it never loses its file. Runs under the write lock, so it never races a registration
        that is renaming its file into place.
        """
        health = Health()
        with connect(self.database) as connection, transaction(connection):
            registered = {row[0] for row in connection.execute("SELECT id FROM masks")}
            health.checked = len(registered)
            for stray in self._strays(registered):
                if stray.mask_id is not None and not force:
                    health.kept.append(stray)
                    continue
                stray.path.unlink(missing_ok=True)
                health.removed.append(str(stray.path))
            health.leftovers = [str(path) for path in self.store.discard_abandoned()]
            health.missing = [
                f"{label(row)} ({row['id'][:12]})"
                for row in connection.execute("SELECT id, name, version FROM masks ORDER BY name, version")
                if not self.store.path_of(row["id"]).is_file()
            ]
        return health


@contextlib.contextmanager
def _flocked(path: Path, operation: int, refusal: str) -> Iterator[None]:
    """A non-blocking OS lock (``LOCK_SH`` or ``LOCK_EX``) on a stored file for the block; none if it is gone.

    Shared locks are what running commands take (:meth:`Maintenance.hold`), the exclusive one is
    what removal takes, so each refuses the other at once instead of waiting.

    Raises:
        CplError: ``refusal``, when another process holds a lock that conflicts.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CplError(refusal) from None
        yield
    finally:
        os.close(fd)


def _content_id(path: Path) -> str | None:
    """The content id of a file that reads as a valid mask (its header's id matches its bits), else None."""
    try:
        return Mask.load(path, scores=False).id
    except Exception:  # any unreadable file is simply not a mask
        return None


def _references(ref: str, runs: int, children: list[str]) -> str:
    """What still points to a mask, as a phrase: ``X has 2 recorded runs and children A@v1, B@v1``."""
    held = [f"{runs} recorded run{'s' if runs != 1 else ''}"] if runs else []
    held += [f"children {', '.join(children)}"] if children else []
    return f"{ref} has {' and '.join(held)}"

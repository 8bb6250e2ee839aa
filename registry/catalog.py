"""The :class:`Registry`: register, resolve, record runs, list, show, lineage and runs.

Every write is a single ``BEGIN IMMEDIATE`` transaction; a mask's file is renamed into the store
inside the same transaction that inserts its row, so readers never see a row without a file. Its
upkeep (verify, remove, hold, collect garbage) is mixed in from
:class:`~cpl_masks.registry.maintenance.Maintenance`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpl_masks.errors import CplError
from cpl_masks.masks.format import Mask, read_header
from cpl_masks.registry.maintenance import Maintenance
from cpl_masks.registry.names import check_task, mask_name, source_of
from cpl_masks.registry.queries import (
    NAMES,
    as_number,
    as_text,
    data_hash,
    existing_file,
    find,
    label,
    lineage_tree,
    listed_summary,
    names_of,
    recorded_task,
    relatives,
    run_matcher,
    run_summary,
    summary_of,
)
from cpl_masks.registry.schema import DATABASE_NAME, check_home, connect, transaction
from cpl_masks.registry.store import STORE_NAME, Staged, Store
from cpl_masks.utils.files import home_dir, sha256_file

__all__ = ["Registry", "Transfer", "source_of"]


@dataclass
class Transfer:
    """A push to or pull from the Hub, recorded with the mask it moved."""

    direction: str  # "push" or "pull"
    repo_id: str
    revision: str | None = None
    commit_sha: str | None = None
    url: str | None = None


class Registry(Maintenance):
    """The registry in one folder: its SQLite database and its content-addressed store.

    Registers, resolves and reads masks and runs here; verify, remove, hold and collect_garbage
    come from :class:`~cpl_masks.registry.maintenance.Maintenance`.

    Args:
        home: the folder; None for ``$CPL_MASKS_HOME`` (else the user cache folder), read now.
    """

    def __init__(self, home: Path | None = None) -> None:
        self.home = Path(home) if home is not None else home_dir()
        self.database = self.home / DATABASE_NAME
        self.store = Store(self.home / STORE_NAME)

    def connect(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A connection to the database (created or migrated on first use)."""
        return connect(self.database)

    def check(self) -> None:
        """Open the database (creating it if absent) and make sure it can be read and written.

        Callers run it before loading a model, so a broken registry fails before the expensive work.

        Raises:
            CplError: the database is damaged or empty, or its folder or store cannot be written.
        """
        with self.connect() as connection, transaction(connection):
            connection.execute("SELECT COUNT(*) FROM masks").fetchone()
        self.store.folder.mkdir(parents=True, exist_ok=True)
        for path in (self.database, self.home, self.store.folder):
            if not os.access(path, os.R_OK | os.W_OK):
                raise CplError(f"registry {path}: not readable and writable by you; check its permissions")

    def register(
        self,
        mask: Mask | Path,
        *,
        task: str | None = None,
        repo_id: str | None = None,
        revision: str | None = None,
        transfer: Transfer | None = None,
        expected_id: str | None = None,
    ) -> str:
        """Store a mask (a :class:`Mask`, or a file) and file it; returns ``name@vN``.

        A file is read once, copied into the store and hashed as it is copied; then the stored copy,
        not the file, is verified (format, content id) and read for the name, kind and provenance, so
        a file changed meanwhile is never filed under an id its stored bytes do not have.
        ``expected_id`` (the id a caller verified before, e.g. a pull) refuses other bits.

        The name is ``<model-slug>/<task>``; the source comes from the mask's kind and metadata
        (:func:`source_of`). Bits already registered (same content id) are not stored again: under
        the same name the existing ``name@vN`` is returned; under another name that name gets a new
        version pointing to the same mask (an alias), so the name asked for can always be found.

        Raises:
            CplError: the file is not a valid mask, or its stored copy is not ``expected_id``.
        """
        check_home(self.home)  # before the store folder is made in it
        if task is not None:
            check_task(task)  # before the copy
        if isinstance(mask, Mask):
            staging, origin, expected_id = self.store.staged_mask(mask), f"mask {mask.id[:12]}", mask.id
        else:
            read_header(mask)  # a file that is no mask is refused before it is copied
            staging, origin = self.store.staged_copy(Path(mask)), str(mask)
        with staging as staged:
            loaded = _verified(staged, origin, expected_id)
            source = source_of(loaded.metadata, kind=loaded.kind)
            name = mask_name(loaded.metadata, task, source=source)
            with self.connect() as connection, transaction(connection):
                existing = connection.execute("SELECT * FROM masks WHERE id = ?", (loaded.id,)).fetchone()
                if existing is None:
                    version = _next_version(connection, name)
                    _insert_mask(connection, loaded, name, version, source, staged, repo_id=repo_id, revision=revision)
                    self.store.place(staged.path, loaded.id)
                    registered = f"{name}@v{version}"
                else:
                    registered = _name_for(connection, existing, name)
                if transfer is not None:
                    _insert_transfer(connection, loaded.id, transfer)
        return registered

    def add_transfer(self, mask_id: str, transfer: Transfer) -> None:
        """Record a push or pull of a registered mask."""
        with self.connect() as connection, transaction(connection):
            _insert_transfer(connection, mask_id, transfer)

    def names(self, mask_id: str) -> list[str]:
        """Every ``name@vN`` of a registered mask: the one it was first registered under, then its aliases."""
        with self.connect() as connection:
            return names_of(connection, mask_id)

    def resolve(self, ref: str) -> Path:
        """The file behind a reference: the path itself if it is a file, else the registered stored file.

        A stored file is verified against the sha256 recorded at registration, and its header
        against the registered id, on every resolve, so no command (``train --mask NAME`` included)
        uses a store file that changed since, nor one whose recorded hash is of other bits (a file
        swapped while an older release registered it; loading checks the header's id against the bits).

        Raises:
            CplError: the reference names nothing, matches several ids, or its stored file is gone or changed.
        """
        path = existing_file(ref)
        if path is not None:
            return path
        with self.connect() as connection:
            row = find(connection, ref)
        stored = self.store.path_of(row["id"])
        if not stored.is_file():
            raise CplError(
                f"mask {ref}: registered as {label(row)} but its file is missing (run `cpl-masks registry verify`)"
            )
        if sha256_file(stored) != row["sha256"] or read_header(stored)["id"] != row["id"]:
            raise CplError(
                f"mask {ref}: the stored file of {label(row)} ({stored}) differs from the sha256 recorded when it was"
                " registered (changed on disk); run `cpl-masks registry verify`"
            )
        return stored

    def record_run(self, mask_path: Path, run: dict[str, Any]) -> str:
        """Record a training run that used a mask (``run`` is the run.json payload); returns the mask's ``name@vN``.

        Missing keys are stored as unknown; a mask file that is not registered yet is registered first.
        The run row keeps the mask's ``name@vN``, so it stays readable after the mask is removed. The
        file's content id is verified (not taken from its header), and a registration must store it.
        """
        mask_id = Mask.load(mask_path, scores=False).id
        with self.connect() as connection:
            known = connection.execute("SELECT * FROM masks WHERE id = ?", (mask_id,)).fetchone()
        ref = label(known) if known is not None else self.register(Path(mask_path), expected_id=mask_id)
        data, final = run.get("data") or {}, run.get("final") or {}
        with self.connect() as connection, transaction(connection):
            connection.execute(
                "INSERT INTO runs (mask_id, mask_ref, task, mode, out_dir, inject_sha256, mastered_sha256,"
                " heldout_sha256, learned, forgotten, heldout_forgotten, payload) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    mask_id,
                    ref,
                    recorded_task(run),
                    run.get("mode"),
                    as_text(run.get("out_dir")),
                    data_hash(data, "inject"),
                    data_hash(data, "mastered"),
                    data_hash(data, "heldout"),
                    as_number(final.get("learned")),
                    as_number(final.get("forgotten")),
                    as_number(final.get("heldout_forgotten")),
                    json.dumps(run, sort_keys=True, default=str),
                ),
            )
        return ref

    def list_masks(self, *, model: str | None = None, task: str | None = None) -> list[dict[str, Any]]:
        """Registered masks by name and version, optionally only those of a model (ref or slug) or task.

        An alias is listed under its own name, with ``alias_of`` naming the mask it is another name of.
        """
        with self.connect() as connection:
            rows = connection.execute(
                "SELECT m.*, n.name AS listed_name, n.version AS listed_version, n.alias,"
                f" (SELECT COUNT(*) FROM runs r WHERE r.mask_id = m.id) AS runs FROM {NAMES} n"
                " JOIN masks m ON m.id = n.mask_id ORDER BY n.name, n.version"
            ).fetchall()
        summaries = [listed_summary(row) for row in rows]
        if model is not None:
            summaries = [item for item in summaries if model in (item["model_ref"], item["name"].split("/")[0])]
        if task is not None:
            summaries = [item for item in summaries if item["name"].split("/", 1)[1] == task]
        return summaries

    def show(self, ref: str) -> dict[str, Any]:
        """Everything known about one mask: its columns, provenance, parents, children, runs and transfers."""
        with self.connect() as connection:
            row = find(connection, ref)
            runs = connection.execute("SELECT * FROM runs WHERE mask_id = ? ORDER BY id", (row["id"],)).fetchall()
            transfers = connection.execute(
                "SELECT * FROM transfers WHERE mask_id = ? ORDER BY id", (row["id"],)
            ).fetchall()
            parents = relatives(connection, row["id"], up=True)
            children = relatives(connection, row["id"], up=False)
            names = names_of(connection, row["id"])
        return summary_of(row) | {
            "names": names,
            "provenance": json.loads(row["provenance"]),
            "parents": parents,
            "children": children,
            "runs": [run_summary(run) for run in runs],
            "transfers": [dict(transfer) for transfer in transfers],
            "path": str(self.store.path_of(row["id"])),
        }

    def lineage(self, ref: str) -> dict[str, Any]:
        """A mask with every ancestor and descendant, each as a nested tree of ``{id, ref, parents|children}``."""
        with self.connect() as connection:
            row = find(connection, ref)
            return {
                "id": row["id"],
                "ref": label(row),
                "parents": lineage_tree(connection, row["id"], up=True, seen={row["id"]}),
                "children": lineage_tree(connection, row["id"], up=False, seen={row["id"]}),
            }

    def runs(self, *, task: str | None = None, mask: str | None = None) -> list[dict[str, Any]]:
        """Recorded training runs, oldest first, also those whose mask was removed (``removed`` is True).

        ``mask`` narrows to one mask: any reference to a registered mask, or the ``name@vN`` or id
        prefix a removed mask's runs kept.
        """
        with self.connect() as connection:
            rows = connection.execute(
                "SELECT r.*, m.id IS NULL AS removed FROM runs r LEFT JOIN masks m ON m.id = r.mask_id ORDER BY r.id"
            ).fetchall()
            wanted = run_matcher(connection, rows, mask) if mask is not None else None
        return [
            run_summary(row) | {"removed": bool(row["removed"])}
            for row in rows
            if (task is None or row["task"] == task) and (wanted is None or wanted(row))
        ]


def _insert_mask(
    connection: sqlite3.Connection,
    mask: Mask,
    name: str,
    version: int,
    source: str,
    staged: Staged,
    *,
    repo_id: str | None,
    revision: str | None,
) -> None:
    """Insert a mask's row and its links to its parents (inside the registering transaction)."""
    metadata = mask.metadata
    model = metadata.get("model") or {}
    connection.execute(
        "INSERT INTO masks (id, name, version, model_ref, model_fingerprint, n_params,"
        " collaborative_share, source, repo_id, revision, sha256, size, provenance)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            mask.id,
            name,
            version,
            model.get("ref"),
            model.get("fingerprint"),
            mask.entries,
            mask.collaborative_share(),
            source,
            repo_id,
            revision,
            staged.sha256,
            staged.size,
            json.dumps(metadata, sort_keys=True),
        ),
    )
    connection.executemany(
        "INSERT OR IGNORE INTO mask_parents (child_id, parent_id, position) VALUES (?, ?, ?)",
        [(mask.id, parent, index) for index, parent in enumerate(metadata.get("parents") or [])],
    )


def _verified(staged: Staged, origin: str, expected_id: str | None) -> Mask:
    """The staged copy, loaded and verified: what is filed is what the store holds, never what was read before.

    Its errors name ``origin`` (the file given, or the mask saved), not the staging file.

    Raises:
        CplError: the copy is not a valid mask, or not the ``expected_id`` the caller verified.
    """
    try:
        loaded = Mask.load(staged.path, scores=False)
    except CplError as error:
        raise CplError(str(error).replace(str(staged.path), origin)) from None
    if expected_id is not None and loaded.id != expected_id:
        raise CplError(
            f"{origin}: changed while it was being registered (its content id is now {loaded.id[:12]}, "
            f"not {expected_id[:12]}); nothing was registered"
        )
    return loaded


def _next_version(connection: sqlite3.Connection, name: str) -> int:
    """One more than the highest version ever issued for ``name``, even if removed; call inside the write lock."""
    row = connection.execute("SELECT last_version FROM name_versions WHERE name = ?", (name,)).fetchone()
    version = (row[0] if row is not None else 0) + 1
    connection.execute(
        "INSERT INTO name_versions (name, last_version) VALUES (?, ?)"
        " ON CONFLICT (name) DO UPDATE SET last_version = excluded.last_version",
        (name, version),
    )
    return version


def _insert_transfer(connection: sqlite3.Connection, mask_id: str, transfer: Transfer) -> None:
    connection.execute(
        "INSERT INTO transfers (mask_id, direction, repo_id, revision, commit_sha, url) VALUES (?,?,?,?,?,?)",
        (mask_id, transfer.direction, transfer.repo_id, transfer.revision, transfer.commit_sha, transfer.url),
    )


def _name_for(connection: sqlite3.Connection, existing: sqlite3.Row, name: str) -> str:
    """The ``name@vN`` under which already registered bits answer to ``name``, adding an alias if needed."""
    if existing["name"] == name:
        return label(existing)
    alias = connection.execute(
        "SELECT * FROM aliases WHERE mask_id = ? AND name = ? ORDER BY version LIMIT 1", (existing["id"], name)
    ).fetchone()
    if alias is not None:
        return label(alias)
    version = _next_version(connection, name)
    connection.execute("INSERT INTO aliases (name, version, mask_id) VALUES (?, ?, ?)", (name, version, existing["id"]))
    return f"{name}@v{version}"

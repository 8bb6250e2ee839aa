"""Registry operations: register, resolve, list, show, lineage, verify, remove and collect garbage.

Every write is a single ``BEGIN IMMEDIATE`` transaction; a mask's file is renamed into the store
inside the same transaction that inserts its row, so readers never see a row without a file.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpl_masks.errors import CplError
from cpl_masks.files import sha256_file
from cpl_masks.masks import Mask, read_header
from cpl_masks.registry import store
from cpl_masks.registry.names import mask_name, split_versioned
from cpl_masks.registry.schema import connect, transaction

SOURCES = ("profiled", "combined", "pulled", "control")
STALE_STAGED_S = 600.0  # a staged copy untouched this long belongs to a dead process


@dataclass
class Transfer:
    """A push to or pull from the Hub, recorded with the mask it moved."""

    direction: str  # "push" or "pull"
    repo_id: str
    revision: str | None = None
    commit_sha: str | None = None
    url: str | None = None


@dataclass
class Health:
    """What :func:`verify` and :func:`collect_garbage` found (or removed)."""

    checked: int = 0
    missing: list[str] = field(default_factory=list)  # "name@vN (id)" whose file is gone
    corrupt: list[str] = field(default_factory=list)  # "name@vN (id)" whose bytes changed
    orphans: list[str] = field(default_factory=list)  # store files without a row
    leftovers: list[str] = field(default_factory=list)  # abandoned staged copies

    @property
    def ok(self) -> bool:
        """True when every registered mask's file is present and intact."""
        return not (self.missing or self.corrupt)


def add_mask(
    path: Path,
    *,
    task: str | None,
    source: str,
    parents: list[str] | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
    transfer: Transfer | None = None,
) -> str:
    """Verify a mask file, copy it into the store and insert its row; returns ``name@vN``.

    A mask already registered (same content id) keeps its name; only ``transfer`` is recorded.
    """
    if source not in SOURCES:
        raise CplError(f"source {source!r}: choose one of {', '.join(SOURCES)}")
    mask = Mask.load(path, scores=False)  # verifies the content id against the bits
    metadata = mask.metadata
    parents = list(parents if parents is not None else metadata.get("parents") or [])
    name = mask_name(metadata, task)
    with store.staged_copy(Path(path)) as staged, connect() as connection, transaction(connection):
        existing = connection.execute("SELECT name, version FROM masks WHERE id = ?", (mask.id,)).fetchone()
        if existing is None:
            version = _next_version(connection, name)
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
                    sha256_file(staged),
                    staged.stat().st_size,
                    json.dumps(metadata, sort_keys=True),
                ),
            )
            connection.executemany(
                "INSERT OR IGNORE INTO mask_parents (child_id, parent_id, position) VALUES (?, ?, ?)",
                [(mask.id, parent, index) for index, parent in enumerate(parents)],
            )
            store.place(staged, mask.id)
        else:
            name, version = existing["name"], existing["version"]
        if transfer is not None:
            _insert_transfer(connection, mask.id, transfer)
    return f"{name}@v{version}"


def source_of(metadata: dict[str, Any]) -> str:
    """The source of a mask registered without one given: ``control``, ``combined`` or ``profiled``.

    Read from its provenance, so a mask first registered by a training run or a push is filed
    as what it is.
    """
    if "control" in (metadata.get("rule") or {}):
        return "control"
    return "combined" if metadata.get("parents") else "profiled"


def _next_version(connection: sqlite3.Connection, name: str) -> int:
    """One more than the highest version of ``name`` (1 for a new name); call inside the write lock."""
    row = connection.execute("SELECT MAX(version) FROM masks WHERE name = ?", (name,)).fetchone()
    return int(row[0] or 0) + 1


def _insert_transfer(connection: sqlite3.Connection, mask_id: str, transfer: Transfer) -> None:
    connection.execute(
        "INSERT INTO transfers (mask_id, direction, repo_id, revision, commit_sha, url) VALUES (?,?,?,?,?,?)",
        (mask_id, transfer.direction, transfer.repo_id, transfer.revision, transfer.commit_sha, transfer.url),
    )


def add_transfer(mask_id: str, transfer: Transfer) -> None:
    """Record a push or pull of a registered mask."""
    with connect() as connection, transaction(connection):
        _insert_transfer(connection, mask_id, transfer)


def find(connection: sqlite3.Connection, ref: str) -> sqlite3.Row:
    """The row a reference names: file path, ``name@vN``, ``name`` (latest), or id / unique id prefix."""
    path = Path(ref).expanduser()
    if path.is_file():
        mask_id = read_header(path)["id"]
        row = connection.execute("SELECT * FROM masks WHERE id = ?", (mask_id,)).fetchone()
        if row is None:
            raise CplError(f"mask {ref}: file is not registered (id {mask_id[:12]})")
        return row
    versioned = split_versioned(ref)
    if versioned is not None:
        row = connection.execute("SELECT * FROM masks WHERE name = ? AND version = ?", versioned).fetchone()
        if row is None:
            raise CplError(f"mask {ref}: no such registered name and version (see `cpl-masks registry list`)")
        return row
    row = connection.execute("SELECT * FROM masks WHERE name = ? ORDER BY version DESC LIMIT 1", (ref,)).fetchone()
    if row is not None:
        return row
    return _find_by_prefix(connection, ref)


def _find_by_prefix(connection: sqlite3.Connection, ref: str) -> sqlite3.Row:
    """The one mask whose id starts with ``ref``."""
    prefix = ref.lower()
    rows = []
    if prefix and all(char in "0123456789abcdef" for char in prefix):
        rows = connection.execute(
            "SELECT * FROM masks WHERE id >= ? AND id < ? ORDER BY id LIMIT 6", (prefix, prefix + "g")
        ).fetchall()
    if not rows:
        raise CplError(f"mask {ref}: no such file, registered name or id (see `cpl-masks registry list`)")
    if len(rows) > 1:
        shown = ", ".join(f"{row['id'][:12]} ({row['name']}@v{row['version']})" for row in rows[:5])
        raise CplError(f"mask {ref}: ambiguous id prefix, matches {shown}; give more characters")
    return rows[0]


def label(row: sqlite3.Row) -> str:
    """``name@vN`` of a row."""
    return f"{row['name']}@v{row['version']}"


def resolve(ref: str) -> Path:
    """The file behind a reference: the path itself if it is a file, else the registered stored file."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    with connect() as connection:
        row = find(connection, ref)
    stored = store.artifact_path(row["id"])
    if not stored.is_file():
        raise CplError(
            f"mask {ref}: registered as {label(row)} but its file is missing (run `cpl-masks registry verify`)"
        )
    return stored


def add_run(mask_path: Path, run: dict[str, Any]) -> str:
    """Record a training run that used a mask, registering the mask first if it is not yet known."""
    mask_id = read_header(mask_path)["id"]
    with connect() as connection:
        known = connection.execute("SELECT name, version FROM masks WHERE id = ?", (mask_id,)).fetchone()
    if known is None:
        metadata = read_header(mask_path)["metadata"]
        add_mask(Path(mask_path), task=None, source=source_of(metadata))
    data = run.get("data") or {}
    final = run.get("final") or {}
    with connect() as connection, transaction(connection):
        connection.execute(
            "INSERT INTO runs (mask_id, task, mode, out_dir, inject_sha256, mastered_sha256, heldout_sha256,"
            " learned, forgotten, heldout_forgotten, payload) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                mask_id,
                _run_task(run),
                run.get("mode"),
                _text(run.get("out_dir")),
                _data_hash(data, "inject"),
                _data_hash(data, "mastered"),
                _data_hash(data, "heldout"),
                _number(final.get("learned")),
                _number(final.get("forgotten")),
                _number(final.get("heldout_forgotten")),
                json.dumps(run, sort_keys=True, default=str),
            ),
        )
        row = connection.execute("SELECT name, version FROM masks WHERE id = ?", (mask_id,)).fetchone()
    return label(row)


def _run_task(run: dict[str, Any]) -> str | None:
    """The task a run trained on: its ``task`` field, else its injection file's name."""
    if run.get("task"):
        return str(run["task"])
    inject = (run.get("data") or {}).get("inject") or {}
    path = inject.get("path") if isinstance(inject, dict) else None
    return Path(path).stem if path else None


def _data_hash(data: dict[str, Any], key: str) -> str | None:
    entry = data.get(key)
    return entry.get("sha256") if isinstance(entry, dict) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def list_masks(*, model: str | None = None, task: str | None = None) -> list[dict[str, Any]]:
    """Registered masks (newest name first), optionally only those of a model (ref or slug) or task."""
    with connect() as connection:
        rows = connection.execute(
            "SELECT m.*, (SELECT COUNT(*) FROM runs r WHERE r.mask_id = m.id) AS runs"
            " FROM masks m ORDER BY m.name, m.version"
        ).fetchall()
    summaries = [_summary(row) | {"runs": row["runs"]} for row in rows]
    if model is not None:
        summaries = [item for item in summaries if model in (item["model_ref"], item["name"].split("/")[0])]
    if task is not None:
        summaries = [item for item in summaries if item["name"].split("/", 1)[1] == task]
    return summaries


def _summary(row: sqlite3.Row) -> dict[str, Any]:
    """The plain columns of a mask row as a dict (provenance left out)."""
    keys = (
        "id",
        "name",
        "version",
        "model_ref",
        "model_fingerprint",
        "n_params",
        "collaborative_share",
        "source",
        "repo_id",
        "revision",
        "sha256",
        "size",
        "created_at",
    )
    return {key: row[key] for key in keys} | {"ref": label(row)}


def _run_summary(run: sqlite3.Row) -> dict[str, Any]:
    """A run's columns plus the question totals its counts are out of (from the stored run.json)."""
    summary = {key: value for key, value in dict(run).items() if key != "payload"}
    final = json.loads(run["payload"]).get("final") or {}
    summary["totals"] = final.get("totals") or {}
    return summary


def show(ref: str) -> dict[str, Any]:
    """Everything known about one mask: its columns, provenance, parents, children, runs and transfers."""
    with connect() as connection:
        row = find(connection, ref)
        runs = connection.execute("SELECT * FROM runs WHERE mask_id = ? ORDER BY id", (row["id"],)).fetchall()
        transfers = connection.execute("SELECT * FROM transfers WHERE mask_id = ? ORDER BY id", (row["id"],)).fetchall()
        parents = _relatives(connection, row["id"], up=True)
        children = _relatives(connection, row["id"], up=False)
    return _summary(row) | {
        "provenance": json.loads(row["provenance"]),
        "parents": parents,
        "children": children,
        "runs": [_run_summary(run) for run in runs],
        "transfers": [dict(transfer) for transfer in transfers],
        "path": str(store.artifact_path(row["id"])),
    }


def _relatives(connection: sqlite3.Connection, mask_id: str, *, up: bool) -> list[dict[str, Any]]:
    """Direct parents (``up``) or children of a mask, with their names when they are registered."""
    if up:
        query = (
            "SELECT p.parent_id AS id, m.name, m.version FROM mask_parents p"
            " LEFT JOIN masks m ON m.id = p.parent_id WHERE p.child_id = ? ORDER BY p.position"
        )
    else:
        query = (
            "SELECT p.child_id AS id, m.name, m.version FROM mask_parents p"
            " JOIN masks m ON m.id = p.child_id WHERE p.parent_id = ? ORDER BY m.name, m.version"
        )
    return [
        {"id": row["id"], "ref": label(row) if row["name"] is not None else None}
        for row in connection.execute(query, (mask_id,)).fetchall()
    ]


def lineage(ref: str) -> dict[str, Any]:
    """A mask with every ancestor and descendant, each as a nested tree of ``{id, ref, parents|children}``."""
    with connect() as connection:
        row = find(connection, ref)
        return {
            "id": row["id"],
            "ref": label(row),
            "parents": _tree(connection, row["id"], up=True, seen={row["id"]}),
            "children": _tree(connection, row["id"], up=False, seen={row["id"]}),
        }


def _tree(connection: sqlite3.Connection, mask_id: str, *, up: bool, seen: set[str]) -> list[dict[str, Any]]:
    key = "parents" if up else "children"
    nodes = []
    for relative in _relatives(connection, mask_id, up=up):
        fresh = relative["id"] not in seen
        seen.add(relative["id"])
        nodes.append(relative | {key: _tree(connection, relative["id"], up=up, seen=seen) if fresh else []})
    return nodes


def verify() -> Health:
    """Re-hash every registered mask's file; list missing and corrupt ones, and orphaned store files."""
    health = Health()
    with connect() as connection:
        rows = connection.execute("SELECT id, name, version, sha256 FROM masks ORDER BY name, version").fetchall()
    for row in rows:
        health.checked += 1
        path = store.artifact_path(row["id"])
        if not path.is_file():
            health.missing.append(f"{label(row)} ({row['id'][:12]})")
        elif sha256_file(path) != row["sha256"]:
            health.corrupt.append(f"{label(row)} ({row['id'][:12]})")
    registered = {row["id"] for row in rows}
    health.orphans = sorted(str(store.artifact_path(mask_id)) for mask_id in store.stored_ids() - registered)
    health.leftovers = [str(path) for path in store.staged_leftovers()]
    return health


def remove(ref: str) -> str:
    """Delete a mask's row (with its runs and transfers) and then its file; returns its ``name@vN``."""
    with connect() as connection, transaction(connection):
        row = find(connection, ref)
        connection.execute("DELETE FROM masks WHERE id = ?", (row["id"],))
    store.artifact_path(row["id"]).unlink(missing_ok=True)  # a crash before this leaves an orphan for gc
    return label(row)


def collect_garbage() -> Health:
    """Remove store files without a row and abandoned staged copies; report rows whose file is missing.

    Runs under the write lock, so it never races a registration that is renaming its file into place.
    """
    health = Health()
    with connect() as connection, transaction(connection):
        registered = {row[0] for row in connection.execute("SELECT id FROM masks")}
        health.checked = len(registered)
        for mask_id in sorted(store.stored_ids() - registered):
            store.artifact_path(mask_id).unlink(missing_ok=True)
            health.orphans.append(str(store.artifact_path(mask_id)))
        for path in store.staged_leftovers():
            if time.time() - path.stat().st_mtime > STALE_STAGED_S:
                path.unlink(missing_ok=True)
                health.leftovers.append(str(path))
        health.missing = [
            f"{row['name']}@v{row['version']} ({row['id'][:12]})"
            for row in connection.execute("SELECT id, name, version FROM masks ORDER BY name, version")
            if not store.artifact_path(row["id"]).is_file()
        ]
    return health

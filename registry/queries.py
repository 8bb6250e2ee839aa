"""Reading the registry: finding a mask by any reference, and its rows shown as lists, trees and summaries.

Every function takes an open connection; :class:`~cpl_masks.registry.catalog.Registry` (with its
:mod:`~cpl_masks.registry.maintenance` side) owns the connections and every write.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cpl_masks.errors import CplError
from cpl_masks.masks.format import Mask
from cpl_masks.registry.names import split_versioned, task_name

# every name@vN: the one each mask was first registered under (alias 0) and its aliases (alias 1)
NAMES = (
    "(SELECT name, version, id AS mask_id, 0 AS alias FROM masks"
    " UNION ALL SELECT name, version, mask_id, 1 AS alias FROM aliases)"
)


def existing_file(ref: str) -> Path | None:
    """The file a reference names when it is a path to an existing file, else None (never an exception).

    A reference is the user's text: ``~user`` of no user, a name too long for the filesystem, a NUL
    byte or a folder that cannot be searched are simply not files here.
    """
    try:
        path = Path(ref).expanduser()
        return path if path.is_file() else None
    except (OSError, ValueError, RuntimeError):  # RuntimeError: ``~user`` whose home is unknown
        return None


def check_reference(ref: str) -> str:
    """Refuse a reference that cannot be looked up: empty, or text that is not valid Unicode (undecodable argv).

    Raises:
        CplError: ``ref`` is empty (it would be a prefix of every id), or holds lone surrogates,
            which the database cannot store or compare.
    """
    if not ref:
        raise CplError("mask '': an empty reference names no mask; give a file, an id prefix, name@vN or a name")
    try:
        ref.encode("utf-8")
    except UnicodeEncodeError:
        shown = ref.encode("utf-8", "backslashreplace").decode("utf-8")[:200]
        raise CplError(f"mask {shown}: not a registered name or id (holds bytes that are not UTF-8)") from None
    return ref


def alias_row(connection: sqlite3.Connection, ref: str) -> sqlite3.Row | None:
    """The alias row ``ref`` names when it is an alias's ``name@vN``, else None."""
    versioned = split_versioned(ref)
    if versioned is None:
        return None
    return connection.execute("SELECT * FROM aliases WHERE name = ? AND version = ?", versioned).fetchone()


def refuse_bare_name(connection: sqlite3.Connection, ref: str) -> None:
    """Refuse a registry name without ``@vN``: removing "the latest" is too easy to get wrong."""
    if existing_file(ref) is not None or split_versioned(check_reference(ref)) is not None:
        return
    latest = latest_row(connection, ref)
    if latest is not None:
        raise CplError(
            f"registry rm {ref}: give a version (name@vN) or an id, not a bare name; the latest is {label(latest)}"
        )


def find(connection: sqlite3.Connection, ref: str) -> sqlite3.Row:
    """The row a reference names: file path, ``name@vN``, ``name`` (latest), or id / unique id prefix.

    A file names the mask its bits are (its content id verified), never the id its header claims.

    Raises:
        CplError: the reference names nothing, several ids, or an invalid or unregistered file.
    """
    path = existing_file(ref)
    if path is not None:
        mask_id = Mask.load(path, scores=False).id
        row = connection.execute("SELECT * FROM masks WHERE id = ?", (mask_id,)).fetchone()
        if row is None:
            raise CplError(f"mask {ref}: file is not registered (id {mask_id[:12]})")
        return row
    versioned = split_versioned(check_reference(ref))
    if versioned is not None:
        row = connection.execute(
            f"SELECT m.* FROM {NAMES} n JOIN masks m ON m.id = n.mask_id WHERE n.name = ? AND n.version = ?", versioned
        ).fetchone()
        if row is None:
            raise CplError(f"mask {ref}: no such registered name and version (see `cpl-masks registry list`)")
        return row
    latest = latest_row(connection, ref)
    if latest is not None:
        return connection.execute("SELECT * FROM masks WHERE id = ?", (latest["mask_id"],)).fetchone()
    return find_by_prefix(connection, ref)


def latest_row(connection: sqlite3.Connection, name: str) -> sqlite3.Row | None:
    """The highest registered version of a name (a mask's own name or an alias), or None."""
    return connection.execute(
        f"SELECT * FROM {NAMES} n WHERE n.name = ? ORDER BY n.version DESC LIMIT 1", (name,)
    ).fetchone()


def names_of(connection: sqlite3.Connection, mask_id: str) -> list[str]:
    """Every ``name@vN`` of a mask: its first name, then its aliases by name and version."""
    rows = connection.execute(
        f"SELECT * FROM {NAMES} n WHERE n.mask_id = ? ORDER BY n.alias, n.name, n.version", (mask_id,)
    ).fetchall()
    return [label(row) for row in rows]


def find_by_prefix(connection: sqlite3.Connection, ref: str) -> sqlite3.Row:
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
        shown = ", ".join(f"{row['id'][:12]} ({label(row)})" for row in rows[:5])
        raise CplError(f"mask {ref}: ambiguous id prefix, matches {shown}; give more characters")
    return rows[0]


def label(row: sqlite3.Row) -> str:
    """``name@vN`` of a row."""
    return f"{row['name']}@v{row['version']}"


def run_matcher(connection: sqlite3.Connection, rows: list[sqlite3.Row], ref: str) -> Callable[[sqlite3.Row], bool]:
    """A test for run rows of the mask ``ref`` names, registered or removed (``name@vN`` or id prefix kept)."""
    check_reference(ref)
    with contextlib.suppress(CplError):
        mask_id = find(connection, ref)["id"]
        return lambda row: row["mask_id"] == mask_id
    prefix = ref.lower()
    matches = [row for row in rows if row["mask_ref"] == ref or row["mask_id"].startswith(prefix)]
    if not matches:
        raise CplError(f"--mask {ref}: no registered mask and no recorded run of a removed mask by that name or id")
    return lambda row: row["mask_ref"] == ref or row["mask_id"].startswith(prefix)


def recorded_task(run: dict[str, Any]) -> str:
    """The task a run trained on: :func:`task_name` of its ``task`` and its injection file."""
    inject = (run.get("data") or {}).get("inject") or {}
    path = inject.get("path") if isinstance(inject, dict) else None
    return task_name(run.get("task") or None, path)


def data_hash(data: dict[str, Any], key: str) -> str | None:
    entry = data.get(key)
    return entry.get("sha256") if isinstance(entry, dict) else None


def as_number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def as_text(value: Any) -> str | None:
    return None if value is None else str(value)


def summary_of(row: sqlite3.Row) -> dict[str, Any]:
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


def listed_summary(row: sqlite3.Row) -> dict[str, Any]:
    """A :func:`_summary` under the name it is listed by (its own, or an alias's) and its run count."""
    listed = {"name": row["listed_name"], "version": row["listed_version"]}
    return (
        summary_of(row)
        | listed
        | {
            "ref": f"{listed['name']}@v{listed['version']}",
            "alias_of": label(row) if row["alias"] else None,
            "runs": row["runs"],
        }
    )


def run_summary(run: sqlite3.Row) -> dict[str, Any]:
    """A run's columns plus the question totals its counts are out of (from the stored run.json)."""
    summary = {key: value for key, value in dict(run).items() if key not in ("payload", "removed")}
    final = json.loads(run["payload"]).get("final") or {}
    summary["totals"] = final.get("totals") or {}
    return summary


def relatives(connection: sqlite3.Connection, mask_id: str, *, up: bool) -> list[dict[str, Any]]:
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


def lineage_tree(connection: sqlite3.Connection, mask_id: str, *, up: bool, seen: set[str]) -> list[dict[str, Any]]:
    key = "parents" if up else "children"
    nodes = []
    for relative in relatives(connection, mask_id, up=up):
        fresh = relative["id"] not in seen
        seen.add(relative["id"])
        nodes.append(relative | {key: lineage_tree(connection, relative["id"], up=up, seen=seen) if fresh else []})
    return nodes

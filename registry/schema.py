"""The registry database: one SQLite file, its schema version, migrations and connections.

Connections run in autocommit mode with WAL journaling, foreign keys on and a generous busy
timeout, so several processes can register masks at once; every write is one explicit
``BEGIN IMMEDIATE`` transaction. A damaged file surfaces as a one-line :class:`CplError`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cpl_masks.errors import CplError
from cpl_masks.utils.files import check_outside_model, default_file_mode

DATABASE_NAME = "registry.sqlite3"
BUSY_TIMEOUT_S = 60.0
SOURCES = ("profiled", "combined", "pulled", "control", "recut", "reprofiled", "retain")  # "pulled": before version 3


def _masks_table(name: str, sources: tuple[str, ...]) -> str:
    """The ``masks`` table's definition under ``name``, accepting the given ``source`` values.

    SQLite cannot change a CHECK constraint in place, so a new source means rebuilding the table.
    """
    allowed = ", ".join(f"'{source}'" for source in sources)
    return f"""CREATE TABLE {name} (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            version INTEGER NOT NULL CHECK (version >= 1),
            model_ref TEXT,
            model_fingerprint TEXT,
            n_params INTEGER NOT NULL,
            collaborative_share REAL NOT NULL,
            source TEXT NOT NULL CHECK (source IN ({allowed})),
            repo_id TEXT,
            revision TEXT,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            provenance TEXT NOT NULL,
            created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
            UNIQUE (name, version)
        )"""


def _runs_table(name: str) -> str:
    """The ``runs`` table's definition under ``name``: a run keeps its mask's id and ``name@vN``.

    No foreign key: a run stays on record (and readable) after its mask is removed.
    """
    return f"""CREATE TABLE {name} (
            id INTEGER PRIMARY KEY,
            mask_id TEXT NOT NULL,
            mask_ref TEXT,
            task TEXT,
            mode TEXT,
            out_dir TEXT,
            inject_sha256 TEXT,
            mastered_sha256 TEXT,
            heldout_sha256 TEXT,
            learned REAL,
            forgotten REAL,
            heldout_forgotten REAL,
            payload TEXT NOT NULL,
            recorded_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
        )"""


# Each entry upgrades the schema by one version; the list index + 1 is the version it reaches.
# Migrations run with foreign keys off (a table rebuild must not cascade) and are checked after.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        _masks_table("masks", SOURCES[:3]),
        """CREATE TABLE mask_parents (
            child_id TEXT NOT NULL REFERENCES masks (id) ON DELETE CASCADE,
            parent_id TEXT NOT NULL,
            position INTEGER NOT NULL,
            PRIMARY KEY (child_id, parent_id)
        )""",
        "CREATE INDEX mask_parents_parent ON mask_parents (parent_id)",
        """CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            mask_id TEXT NOT NULL REFERENCES masks (id) ON DELETE CASCADE,
            task TEXT,
            mode TEXT,
            out_dir TEXT,
            inject_sha256 TEXT,
            mastered_sha256 TEXT,
            heldout_sha256 TEXT,
            learned REAL,
            forgotten REAL,
            heldout_forgotten REAL,
            payload TEXT NOT NULL,
            recorded_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
        )""",
        "CREATE INDEX runs_mask ON runs (mask_id)",
        """CREATE TABLE transfers (
            id INTEGER PRIMARY KEY,
            mask_id TEXT NOT NULL REFERENCES masks (id) ON DELETE CASCADE,
            direction TEXT NOT NULL CHECK (direction IN ('push', 'pull')),
            repo_id TEXT NOT NULL,
            revision TEXT,
            commit_sha TEXT,
            url TEXT,
            at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
        )""",
        "CREATE INDEX transfers_mask ON transfers (mask_id)",
    ),
    (  # version 2: control masks (random, gradient-magnitude) get their own source
        _masks_table("masks_new", SOURCES[:4]),
        "INSERT INTO masks_new SELECT * FROM masks",
        "DROP TABLE masks",
        "ALTER TABLE masks_new RENAME TO masks",
    ),
    (  # version 3: re-cuts get their own source, runs outlive their mask, versions are never reused
        _masks_table("masks_new", SOURCES[:5]),
        "INSERT INTO masks_new SELECT * FROM masks",
        "DROP TABLE masks",
        "ALTER TABLE masks_new RENAME TO masks",
        _runs_table("runs_new"),
        "INSERT INTO runs_new SELECT r.id, r.mask_id, m.name || '@v' || m.version, r.task, r.mode, r.out_dir,"
        " r.inject_sha256, r.mastered_sha256, r.heldout_sha256, r.learned, r.forgotten, r.heldout_forgotten,"
        " r.payload, r.recorded_at FROM runs r LEFT JOIN masks m ON m.id = r.mask_id",
        "DROP TABLE runs",
        "ALTER TABLE runs_new RENAME TO runs",
        "CREATE INDEX runs_mask ON runs (mask_id)",
        "CREATE TABLE name_versions (name TEXT PRIMARY KEY, last_version INTEGER NOT NULL)",
        "INSERT INTO name_versions SELECT name, MAX(version) FROM masks GROUP BY name",
    ),
    (  # version 4: the same bits registered under another task name get that name too, as an alias
        """CREATE TABLE aliases (
            name TEXT NOT NULL,
            version INTEGER NOT NULL CHECK (version >= 1),
            mask_id TEXT NOT NULL REFERENCES masks (id) ON DELETE CASCADE,
            created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
            PRIMARY KEY (name, version)
        )""",
        "CREATE INDEX aliases_mask ON aliases (mask_id)",
    ),
    (  # version 5: masks profiled again during training (train --reprofile-every) get their own source
        _masks_table("masks_new", SOURCES[:6]),
        "INSERT INTO masks_new SELECT * FROM masks",
        "DROP TABLE masks",
        "ALTER TABLE masks_new RENAME TO masks",
    ),
    (  # version 6: retain sets (profile --kind retain), and their refreshes, are filed in the same table
        _masks_table("masks_new", SOURCES),
        "INSERT INTO masks_new SELECT * FROM masks",
        "DROP TABLE masks",
        "ALTER TABLE masks_new RENAME TO masks",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


@contextlib.contextmanager
def connect(path: Path) -> Iterator[sqlite3.Connection]:
    """Open the registry database at ``path`` (creating or migrating it); SQLite failures become one line.

    Raises:
        CplError: the file is empty, not a registry, damaged, from a newer release, or locked too long.
    """
    check_home(path.parent)
    if path.is_dir():
        raise CplError(_move_aside(path, "it is a folder, not a database file"))
    if not path.exists():
        create(path)
    check_not_empty(path)
    with database_errors(path):
        connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    connection.row_factory = sqlite3.Row
    try:
        with database_errors(path):
            check_is_registry(path, connection)
            connection.execute("PRAGMA foreign_keys = ON")
            use_wal(connection)
            migrate(connection, path)
            yield connection
    finally:
        connection.close()


def create(path: Path) -> None:
    """Make a complete new database under a temporary name beside ``path``, then link it into place.

    ``os.link`` fails when another process linked its own first; that one is used instead, so no
    process ever opens a half-made file (an empty file would read as an empty, broken registry).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, default_file_mode())  # the user's umask (SQLite gives its -wal and -shm files the same)
    os.close(fd)
    staged = Path(name)
    try:
        connection = sqlite3.connect(staged, isolation_level=None)
        try:
            with database_errors(path):
                connection.execute("PRAGMA journal_mode = WAL")
                migrate(connection, path)
        finally:
            connection.close()
        with contextlib.suppress(FileExistsError):  # another process won the race: use its database
            os.link(staged, path)
    finally:
        staged.unlink(missing_ok=True)


def check_home(home: Path) -> None:
    """Refuse a registry folder that is a file, lies under one (``$CPL_MASKS_HOME`` set to a file) or in a model."""
    existing = home.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == home.absolute() else f"cannot be created, {existing} is a file"
        raise CplError(f"registry folder {home} (CPL_MASKS_HOME): {where}, not a folder")
    check_outside_model(home, "registry folder (CPL_MASKS_HOME)")  # never among a model's weights


def check_not_empty(path: Path) -> None:
    """Refuse a zero-byte database file: taken for a fresh registry, every stored mask would look orphaned.

    :func:`create` only ever links complete databases into place, so an empty file is damage.
    """
    if path.stat().st_size == 0:
        raise CplError(_move_aside(path, "the file is empty (0 bytes)"))


def check_is_registry(path: Path, connection: sqlite3.Connection) -> None:
    """Refuse a database with schema version 0: no tables at all, or some other program's tables."""
    if schema_version(connection) != 0:
        return
    tables = connection.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
    raise CplError(_move_aside(path, "it holds no tables" if tables == 0 else "it is not a cpl-masks registry"))


def _move_aside(path: Path, problem: str) -> str:
    return f"registry database {path}: {problem}; move it aside (the stored masks stay) to start a fresh registry"


def use_wal(connection: sqlite3.Connection) -> None:
    """Switch to WAL journaling, retrying while another process holds the lock.

    SQLite answers a journal-mode change with "database is locked" at once, without waiting on the
    busy timeout, when several processes open a new database together.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            connection.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def database_errors(path: Path) -> Iterator[None]:
    """Report a corrupt, locked or foreign database file as a :class:`CplError` naming it."""
    try:
        yield
    except sqlite3.OperationalError as error:
        if "locked" in str(error) or "busy" in str(error):
            raise CplError(f"registry database {path}: still locked by another process ({error})") from error
        if "disk" in str(error) or "full" in str(error):
            raise CplError(f"registry database {path}: cannot write ({error}; {_free_space(path)})") from error
        raise CplError(f"registry database {path}: {error}") from error
    except sqlite3.DatabaseError as error:
        raise CplError(
            f"registry database {path}: unreadable ({error}); move it aside to start a fresh registry"
        ) from error


def _free_space(path: Path) -> str:
    """How much room the disk holding ``path`` has left, as a hint to why a write failed."""
    existing = path.absolute().parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return "check the disk holding it"
    return f"{free / 2**20:.1f} MiB free on its disk" + (": the disk is full" if free < 2**20 else "")


@contextlib.contextmanager
def transaction(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction that takes the write lock up front (so version numbers never race)."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def migrate(connection: sqlite3.Connection, path: Path) -> None:
    """Bring the schema up to :data:`SCHEMA_VERSION`, refusing a database from a newer release."""
    if schema_version(connection) == SCHEMA_VERSION:
        return
    connection.execute("PRAGMA foreign_keys = OFF")  # only outside a transaction; rebuilt tables keep children
    try:
        with transaction(connection):
            current = schema_version(connection)  # re-read under the lock: another process may have migrated
            if current > SCHEMA_VERSION:
                raise CplError(
                    f"registry database {path}: schema version {current} is newer than this cpl-masks "
                    f"understands ({SCHEMA_VERSION}); upgrade cpl-masks"
                )
            for version in range(current, SCHEMA_VERSION):
                for statement in MIGRATIONS[version]:
                    connection.execute(statement)
            if connection.execute("PRAGMA foreign_key_check").fetchone() is not None:
                raise CplError(f"registry database {path}: migration left rows without their mask; nothing changed")
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    finally:
        connection.execute("PRAGMA foreign_keys = ON")


def schema_version(connection: sqlite3.Connection) -> int:
    """The schema version stored in the database header (0 for a new file)."""
    return int(connection.execute("PRAGMA user_version").fetchone()[0])

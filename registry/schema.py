"""The registry database: one SQLite file, its schema version, migrations and connections.

Connections run in autocommit mode with WAL journaling, foreign keys on and a generous busy
timeout, so several processes can register masks at once; every write is one explicit
``BEGIN IMMEDIATE`` transaction. A damaged file surfaces as a one-line :class:`CplError`.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from cpl_masks.errors import CplError
from cpl_masks.files import home_dir

DATABASE_NAME = "registry.sqlite3"
BUSY_TIMEOUT_S = 60.0


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


# Each entry upgrades the schema by one version; the list index + 1 is the version it reaches.
# Migrations run with foreign keys off (a table rebuild must not cascade) and are checked after.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        _masks_table("masks", ("profiled", "combined", "pulled")),
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
        _masks_table("masks_new", ("profiled", "combined", "pulled", "control")),
        "INSERT INTO masks_new SELECT * FROM masks",
        "DROP TABLE masks",
        "ALTER TABLE masks_new RENAME TO masks",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


def database_path() -> Path:
    """Where the registry database lives: ``$CPL_MASKS_HOME/registry.sqlite3``."""
    return home_dir() / DATABASE_NAME


@contextlib.contextmanager
def connect() -> Iterator[sqlite3.Connection]:
    """Open the registry (creating or migrating it) and turn SQLite failures into one-line errors."""
    path = database_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    connection.row_factory = sqlite3.Row
    try:
        with database_errors(path):
            connection.execute("PRAGMA foreign_keys = ON")
            use_wal(connection)
            migrate(connection, path)
            yield connection
    finally:
        connection.close()


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
        raise CplError(f"registry database {path}: {error}") from error
    except sqlite3.DatabaseError as error:
        raise CplError(
            f"registry database {path}: unreadable ({error}); move it aside to start a fresh registry"
        ) from error


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

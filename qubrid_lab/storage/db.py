"""The SQLite database under the home directory: one file, WAL journal, numbered migrations.

Each use borrows a connection (``connect()`` to read, ``transaction()`` to write) from a small pool of open
ones, so no two threads ever use one at once and each process has its own. WAL lets readers run while a
writer commits; ``BEGIN IMMEDIATE`` makes writers queue on the busy timeout instead of failing half-way.

Keeping connections open is what makes a poll cheap: opening one costs more than the query it serves, and
closing the last one open on the file checkpoints the WAL into the database, syncs it and deletes it, which
the next connection has to set up again. A training worker writing a step, or a server answering a poll,
paid that on nearly every use while no other connection happened to be open.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qubrid_lab.errors import InternalError

BUSY_TIMEOUT_SECONDS = 30
IDLE_CONNECTIONS = 4  # kept open per process; more are opened when more threads need one at once, then closed

# Migration N is MIGRATIONS[N - 1]; PRAGMA user_version records the last one applied.
# Append new migrations; never edit one that has shipped.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE datasets (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            filename TEXT NOT NULL,
            stored_as TEXT NOT NULL,
            size_bytes INTEGER NOT NULL,
            row_count INTEGER NOT NULL,
            columns TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            status TEXT NOT NULL,
            base_model TEXT NOT NULL,
            dataset_id TEXT NOT NULL,
            task_type TEXT NOT NULL,
            hyperparameters TEXT NOT NULL,
            column_mapping TEXT,
            suffix TEXT,
            fine_tuned_model TEXT,
            training_loss REAL,
            validation_loss REAL,
            steps_completed INTEGER NOT NULL DEFAULT 0,
            epochs_completed REAL NOT NULL DEFAULT 0,
            total_steps INTEGER,
            error TEXT,
            created_at REAL NOT NULL,
            started_at REAL,
            completed_at REAL
        )""",
        "CREATE INDEX jobs_by_status ON jobs (status)",
        "CREATE INDEX jobs_by_dataset ON jobs (dataset_id)",
        """CREATE TABLE job_events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            created_at REAL NOT NULL,
            level TEXT NOT NULL,
            type TEXT NOT NULL,
            message TEXT NOT NULL,
            data TEXT NOT NULL
        )""",
        "CREATE INDEX job_events_by_job ON job_events (job_id, seq)",
        """CREATE TABLE fine_tuned_models (
            id TEXT PRIMARY KEY,
            base_model TEXT NOT NULL,
            job_id TEXT NOT NULL,
            status TEXT NOT NULL,
            adapter_dir TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
    ),
    (  # 2: API keys (hashed), the usage ledger, and an owner (the creating key's id) on every user object
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            hash TEXT NOT NULL UNIQUE,
            admin INTEGER NOT NULL DEFAULT 0,
            credits REAL,
            spent REAL NOT NULL DEFAULT 0,
            rpm INTEGER,
            tpm INTEGER,
            created_at REAL NOT NULL,
            last_used_at REAL,
            revoked_at REAL
        )""",
        """CREATE TABLE usage (
            date TEXT NOT NULL,
            key_id TEXT NOT NULL,
            key_name TEXT NOT NULL,
            model TEXT NOT NULL,
            requests INTEGER NOT NULL DEFAULT 0,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            training_tokens INTEGER NOT NULL DEFAULT 0,
            cost REAL NOT NULL DEFAULT 0,
            PRIMARY KEY (date, key_id, model)
        )""",
        "ALTER TABLE datasets ADD COLUMN owner TEXT",
        "ALTER TABLE jobs ADD COLUMN owner TEXT",
        "ALTER TABLE fine_tuned_models ADD COLUMN owner TEXT",
    ),
    (  # 3: a job's own validation dataset (OpenAI's validation_file), instead of a split of its training data
        "ALTER TABLE jobs ADD COLUMN validation_dataset_id TEXT",
    ),
)


# The row filter for a scope: bound twice to an owner id (a key's objects only) or to None (everyone's).
OWNED = "(? IS NULL OR owner = ?)"


def new_id(prefix: str) -> str:
    """A fresh random id such as ``ds-3f2a...`` (24 hex digits after the prefix)."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Database:
    """The database file at ``path``; call ``migrate()`` once before use (the server does at start).

    ``close()`` when done (the server does at shutdown): it closes the idle connections, so the last one
    checkpoints the WAL into the file. The database stays usable; the next use opens a connection again.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._idle: list[sqlite3.Connection] = []
        self._inherited: list[sqlite3.Connection] = []  # a forked child's copies of its parent's: never touched
        self._lock = threading.Lock()
        self._pid = os.getpid()

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in autocommit mode (each statement is its own transaction), for this use only.

        Fetch what the block needs inside it: a cursor kept past the block would hold its statement's read
        snapshot open on a connection that the next use then gets.
        """
        connection = self._borrow()
        try:
            yield connection
        except sqlite3.Error:  # whatever state the error left it in, a fresh connection is cheap
            connection.close()
            raise
        except BaseException:
            self._give_back(connection)
            raise
        self._give_back(connection)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A connection inside one write transaction: committed on success, rolled back on any error."""
        with self.connect() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                if connection.in_transaction:  # some errors (a full disk, say) have rolled it back already
                    connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def close(self) -> None:
        """Close the idle connections; one in use now is kept when it comes back, for the next use."""
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _borrow(self) -> sqlite3.Connection:
        with self._lock:
            if self._pid != os.getpid():
                # A forked child: SQLite forbids using the parent's connections here, and closing one could write
                # its stale view of the WAL into the file; so they are kept, unused, and the child opens its own.
                self._inherited += self._idle
                self._idle, self._pid = [], os.getpid()
            if self._idle:
                return self._idle.pop()
        connection = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
        )  # the pool hands it to one thread at a time
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA foreign_keys = ON")
        connection.execute("PRAGMA synchronous = NORMAL")  # safe in WAL mode; a crash loses no commit
        return connection

    def _give_back(self, connection: sqlite3.Connection) -> None:
        """Keep the connection for the next use, unless enough are idle or a transaction was left open."""
        with self._lock:
            if not connection.in_transaction and len(self._idle) < IDLE_CONNECTIONS:
                self._idle.append(connection)
                return
        connection.close()

    def migrate(self) -> int:
        """Create the file if needed and apply the migrations it lacks; returns the schema version."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as connection:
            connection.execute("PRAGMA journal_mode = WAL")  # recorded in the file: set once, kept for good
        with self.transaction() as connection:
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise InternalError(
                    f"The database {self.path} has schema version {version}, newer than this qubrid_lab knows "
                    f"({len(MIGRATIONS)}); upgrade qubrid_lab or point QUBRID_LAB_HOME elsewhere."
                )
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
        return len(MIGRATIONS)

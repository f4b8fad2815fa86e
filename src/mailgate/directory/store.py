"""The directory on SQLite: `SqliteDirectory` implements `mailgate.directory.Directory`.

Owns: the database file (created 0600, WAL mode) and its connections; the queries and rules are
directory/sql.py's, shared with PostgreSQL. Opening a file migrates it to the newest schema
(directory/migrate.py): one node, one file, nothing to coordinate. Must not: know about SMTP.

Concurrency: the server verifies passwords from several worker threads while `mailgate user
...` may write from another process. Each thread gets its own connection (sqlite3 connections
must not be shared between threads in use); the database is in WAL mode so readers never wait
for a writer, and writers take the lock up front (BEGIN IMMEDIATE) and wait up to BUSY_TIMEOUT
for each other.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mailgate.directory import migrate
from mailgate.directory.sql import SqlDirectory
from mailgate.errors import DirectoryError

SCHEMA_VERSION = migrate.latest("sqlite")
BUSY_TIMEOUT = 10.0  # seconds a writer waits for another writer (CLI vs. server)


class SqliteDirectory(SqlDirectory):
    """The directory in one SQLite file.

    path: the database file; created (0600) with its schema if missing, migrated if older.
          Its folder must exist.
    """

    dialect = "sqlite"

    def __init__(self, path: Path, *, default_domain: str, data_dir: Path) -> None:
        super().__init__(default_domain=default_domain, data_dir=data_dir)
        self.path = Path(path)
        self.label = str(path)
        self._local = threading.local()
        self._lock = threading.Lock()  # guards _connections
        self._connections: list[sqlite3.Connection] = []
        try:
            self._open_schema()
        except BaseException:
            self.close()
            raise

    # --- connections and transactions ----------------------------------------------

    def close(self) -> None:
        """Close every thread's connection. Call when no other thread uses the directory."""
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
            self._local = threading.local()

    def _db(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _connect(self) -> sqlite3.Connection:
        try:
            if not self.path.exists():
                # The file holds password hashes: create it private before SQLite does (with
                # the umask). SQLite gives its -wal and -shm files the same permissions.
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError as e:
            raise DirectoryError(f"{self.path}: cannot create the database: {e.strerror}") from None
        try:
            # One connection per thread (see the module docstring); check_same_thread is off
            # only so that close() may close them all from the thread that owns the directory.
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                   check_same_thread=False)  # fmt: skip
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys = ON")
            # Accounts are few and rarely change: every commit durable, even on power loss.
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as e:
            raise DirectoryError(f"{self.path}: cannot open the database: {e}") from None
        return conn

    def _open_schema(self) -> None:
        try:
            version = self.schema_version()
        except DirectoryError as e:
            raise DirectoryError(f"cannot open the database: {e}") from None
        self._refuse_newer(version or 0)
        if version is None:
            # WAL must be set outside a transaction; it is a property of the file.
            db = self._db()
            try:
                if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    db.execute("PRAGMA journal_mode = WAL")
            except sqlite3.Error as e:
                raise DirectoryError(f"{self.path}: cannot open the database: {e}") from None
        if version != SCHEMA_VERSION:
            self.migrate()

    def _has_schema_table(self, db: Any) -> bool:
        row = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()
        return row is not None

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; the write lock is taken at once (no upgrade deadlocks)."""
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.rollback()
                raise
            db.execute("COMMIT")
        except sqlite3.Error as e:
            if db.in_transaction:
                db.rollback()
            raise DirectoryError(f"{self.path}: {e}") from None

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        try:
            db.execute("BEGIN")
            try:
                yield db
            finally:
                db.rollback()
        except sqlite3.Error as e:
            raise DirectoryError(f"{self.path}: {e}") from None

    def _migration(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock before the version is read: a second migrator
        # waits, then finds the new version and applies nothing.
        return self._write()

    def _run_script(self, db: Any, sql: str) -> None:
        # executescript() would COMMIT the open transaction first; feed the statements one by
        # one instead (complete_statement() knows that a trigger's BEGIN ... END is one).
        statement = ""
        for line in sql.splitlines(keepends=True):
            statement += line
            if sqlite3.complete_statement(statement):
                db.execute(statement)
                statement = ""
        if statement.strip() and not _only_comments(statement):
            raise DirectoryError(f"{self.path}: migration script ends inside a statement")

    def _query_one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        try:
            row: sqlite3.Row | None = self._db().execute(sql, params).fetchone()
        except sqlite3.Error as e:
            raise DirectoryError(f"{self.path}: {e}") from None
        return row


def _only_comments(text: str) -> bool:
    return all(not line.strip() or line.strip().startswith("--") for line in text.splitlines())

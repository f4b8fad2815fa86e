"""The directory on PostgreSQL: `PostgresDirectory` implements `mailgate.directory.Directory`.

Owns: the connection pool (psycopg 3 with psycopg_pool), mapping driver errors to
DirectoryError / DirectoryUnavailable, and listening for the NOTIFY that every change sends
(`listen()`, used by directory/cache.py). The queries and rules are directory/sql.py's, shared
with SQLite. Must not: know about SMTP, or put a password from the URL in a message or a log.

The interface is synchronous, like SQLite's: the CLI calls it directly, the server from worker
threads (never on the event loop; see directory/cache.py). A pool connection is checked out
per transaction; when the server cannot be reached, a call fails after CONNECT_TIMEOUT (2 s) with
DirectoryUnavailable, which AUTH answers with 454 4.7.0.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from mailgate.directory.sql import SqlDirectory
from mailgate.errors import DirectoryError, DirectoryUnavailable

log = logging.getLogger(__name__)
# The pool logs every failed reconnection attempt (several a second while the database is
# down); the directory's users log one line a minute instead (directory/cache.py, auth/).
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)

CHANNEL = "mailgate_directory"  # the NOTIFY channel of directory changes (see the migrations)
CONNECT_TIMEOUT = 2.0  # seconds to wait for a connection before answering "unavailable"
_MIGRATION_LOCK = 0x6D61696C67617465  # pg_advisory_xact_lock key ("mailgate")
_PLACEHOLDER = re.compile(r"\?")


def redact(url: str) -> str:
    """`url` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class _Connection:
    """A psycopg connection that takes the `?` placeholders the shared queries use."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> psycopg.Cursor[Any]:
        if parameters:
            return self._conn.execute(_PLACEHOLDER.sub("%s", sql), parameters)
        return self._conn.execute(sql)


class PostgresDirectory(SqlDirectory):
    """The directory in a PostgreSQL database shared by every node.

    url:      postgresql://USER[:PASSWORD]@HOST:PORT/DB (libpq's URI; a password may also come
              from ~/.pgpass or PGPASSWORD).
    max_size: connections in the pool (the server's verification threads, plus one).
    check:    check the schema version now (the CLI); the server checks it when it first loads.
    """

    dialect = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        default_domain: str,
        data_dir: Path,
        max_size: int = 4,
        check: bool = True,
    ) -> None:
        super().__init__(default_domain=default_domain, data_dir=data_dir)
        self.url = url
        self.label = redact(url)
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            kwargs={
                "autocommit": True,
                "row_factory": dict_row,
                "connect_timeout": max(1, round(CONNECT_TIMEOUT)),
            },
            timeout=CONNECT_TIMEOUT,
            open=False,
            name="mailgate-directory",
        )
        self._pool.open(wait=False)
        if check:
            try:
                self.check_schema()
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        self._pool.close()

    # --- connections and transactions --------------------------------------------------

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._pool.connection() as conn:
                yield conn
        except PoolTimeout:
            raise DirectoryUnavailable(f"{self.label}: cannot connect to the database") from None
        except psycopg.OperationalError as e:
            raise DirectoryUnavailable(f"{self.label}: {_one_line(e)}") from None
        except psycopg.Error as e:
            raise DirectoryError(f"{self.label}: {_one_line(e)}") from None

    @contextlib.contextmanager
    def _transaction(
        self, prepare: Callable[[_Connection], object] | None = None
    ) -> Iterator[_Connection]:
        with self._connection() as conn, conn.transaction():
            db = _Connection(conn)
            if prepare is not None:
                prepare(db)
            yield db

    def _write(self) -> contextlib.AbstractContextManager[_Connection]:
        return self._transaction()

    def _read(self) -> contextlib.AbstractContextManager[_Connection]:
        # REPEATABLE READ: the queries of one read see one snapshot, as in SQLite.
        return self._transaction(
            lambda db: db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        )

    def _migration(self) -> contextlib.AbstractContextManager[_Connection]:
        # Two nodes migrating at once: the second waits here, then finds the new version.
        return self._transaction(
            lambda db: db.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
        )

    def _run_script(self, db: Any, sql: str) -> None:
        db.execute(sql)  # no parameters: psycopg sends the whole script at once

    def _has_schema_table(self, db: Any) -> bool:
        row = db.execute("SELECT to_regclass('schema_version') IS NOT NULL AS present").fetchone()
        return bool(row["present"])

    def _query_one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with self._connection() as conn:
            return _Connection(conn).execute(sql, params).fetchone()

    # --- change notifications ------------------------------------------------------------

    def listen(self, stop: Callable[[], bool], wake: Callable[[bool], None], *,
               timeout: float = 1.0) -> None:  # fmt: skip
        """Call `wake(True)` at once for every NOTIFY on CHANNEL (and once after LISTEN, for
        what happened before it), `wake(False)` every `timeout` seconds without one, until
        `stop()` is true (checked every `timeout` seconds).

        Runs in the caller's thread on a connection of its own (not the pool's); raises
        DirectoryUnavailable when the connection fails.
        """
        try:
            with psycopg.connect(
                self.url, autocommit=True, connect_timeout=max(1, round(CONNECT_TIMEOUT))
            ) as conn:
                conn.execute(f"LISTEN {CHANNEL}")
                wake(True)
                while not stop():
                    notified = False
                    for _ in conn.notifies(timeout=timeout, stop_after=1):
                        notified = True
                    wake(notified)
        except psycopg.Error as e:
            raise DirectoryUnavailable(f"{self.label}: {_one_line(e)}") from None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__

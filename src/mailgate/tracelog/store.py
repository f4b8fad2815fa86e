"""The event log's files: one SQLite database per UTC day in `[trace] path`.

Why SQLite files per day (docs/ARCHITECTURE.md, "The message event log"): `mailgate trace`
must find a message among millions by queue id, Message-ID, address or login in well under a
second, across restarts, after the message left the spool, while several processes write.
A table of (key, qid) pairs with a B-tree index answers that with a few page reads; SQLite in
WAL mode takes appends from every worker and the supervisor without a daemon, readers never
block writers, and a crash loses at most the last unsynced batch. Whole-day files make
retention a file deletion (no DELETE, no VACUUM) and bound the disk use.

Owns: the schema, the day files, batched appends and retention. Must not: import anything
from mailgate but `config`; decide what is recorded (tracelog/__init__.py does).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS event (
    at   REAL NOT NULL,   -- Unix time of the event
    qid  TEXT NOT NULL,   -- queue id; '' for a refusal before any message existed
    kind TEXT NOT NULL,   -- accepted, rejected, refused, delivered, deferred, bounced, ...
    data TEXT NOT NULL    -- JSON object: the event's fields
);
CREATE INDEX IF NOT EXISTS event_qid ON event (qid);
CREATE INDEX IF NOT EXISTS event_at ON event (at);
CREATE TABLE IF NOT EXISTS key (
    k   TEXT NOT NULL,    -- normalised: qid, Message-ID, address, login
    qid TEXT NOT NULL,
    PRIMARY KEY (k, qid)
) WITHOUT ROWID;
-- Per-minute roll-ups for `mailgate status`, kept by append(): the last hour of a busy day is
-- sixty rows per kind here instead of a hundred thousand events to read.
CREATE TABLE IF NOT EXISTS minute_count (
    minute INTEGER NOT NULL,  -- Unix time // 60
    kind   TEXT NOT NULL,
    n      INTEGER NOT NULL,
    PRIMARY KEY (minute, kind)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS minute_sender (
    minute   INTEGER NOT NULL,
    axis     TEXT NOT NULL,   -- 'login' or 'net' (the client's /24 or /64)
    who      TEXT NOT NULL,
    messages INTEGER NOT NULL,
    rcpts    INTEGER NOT NULL,
    PRIMARY KEY (minute, axis, who)
) WITHOUT ROWID;
"""
_PREFIX, _SUFFIX = "events-", ".sqlite"
BUSY_TIMEOUT_MS = 10_000  # another process's batch is a few milliseconds


@dataclass(frozen=True, slots=True)
class Event:
    at: float
    qid: str
    kind: str
    keys: tuple[str, ...]
    data: dict[str, object]


def normalise(text: str) -> str:
    """One spelling per key: no angle brackets or spaces, lower case (addresses, logins and
    Message-IDs are looked up case-insensitively; queue ids are upper case anyway)."""
    return text.strip().strip("<>").strip().lower()


def day_of(at: float) -> date:
    return datetime.fromtimestamp(at, UTC).date()


def day_path(folder: Path, day: date) -> Path:
    return folder / f"{_PREFIX}{day.isoformat()}{_SUFFIX}"


def day_files(folder: Path) -> list[tuple[date, Path]]:
    """Every day file, oldest first."""
    found: list[tuple[date, Path]] = []
    try:
        names = [p for p in folder.iterdir() if p.name.startswith(_PREFIX)]
    except FileNotFoundError:
        return []
    for path in names:
        if not path.name.endswith(_SUFFIX):
            continue
        try:
            day = date.fromisoformat(path.name[len(_PREFIX) : -len(_SUFFIX)])
        except ValueError:
            continue
        found.append((day, path))
    return sorted(found)


def connect(path: Path, *, write: bool) -> sqlite3.Connection:
    """A connection to one day file; `write` creates it (0600) with its schema."""
    if write:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists():
            path.touch(mode=0o600)
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        # The spool is the durable record; this log may lose its last batch in a power cut.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
    else:
        # mode=rw, not ro: reading a WAL database needs its -shm file, which a read-only
        # connection could not create after the last writer removed it. Never creates.
        uri = f"file:{path}?mode=rw"
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return conn


def append(conn: sqlite3.Connection, events: Sequence[Event]) -> None:
    """One transaction for a batch of events of one day."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(
            "INSERT INTO event (at, qid, kind, data) VALUES (?, ?, ?, ?)",
            [(e.at, e.qid, e.kind, json.dumps(e.data, separators=(",", ":"))) for e in events],
        )
        conn.executemany(
            "INSERT OR IGNORE INTO key (k, qid) VALUES (?, ?)",
            [(k, e.qid) for e in events for k in e.keys if k and e.qid],
        )
        counts, senders = _roll_up(events)
        conn.executemany(
            "INSERT INTO minute_count (minute, kind, n) VALUES (?, ?, ?)"
            " ON CONFLICT (minute, kind) DO UPDATE SET n = n + excluded.n",
            [(*k, n) for k, n in counts.items()],
        )
        conn.executemany(
            "INSERT INTO minute_sender (minute, axis, who, messages, rcpts) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (minute, axis, who) DO UPDATE SET messages = messages"
            " + excluded.messages, rcpts = rcpts + excluded.rcpts",
            [(*k, m, r) for k, (m, r) in senders.items()],
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _roll_up(
    events: Sequence[Event],
) -> tuple[dict[tuple[int, str], int], dict[tuple[int, str, str], tuple[int, int]]]:
    """Events per (minute, kind); accepted messages and recipients per (minute, login) and
    (minute, client network)."""
    counts: dict[tuple[int, str], int] = {}
    senders: dict[tuple[int, str, str], tuple[int, int]] = {}
    for e in events:
        minute = int(e.at // 60)
        counts[(minute, e.kind)] = counts.get((minute, e.kind), 0) + 1
        if e.kind != "accepted":
            continue
        to = e.data.get("to")
        rcpts = len(to) if isinstance(to, list) else 0
        for by in ("login", "net"):
            who = str(e.data.get(by) or "")
            if who:
                m, r = senders.get((minute, by, who), (0, 0))
                senders[(minute, by, who)] = (m + 1, r + rcpts)
    return counts, senders


def prune(folder: Path, *, retention_days: int, max_size_mb: int,
          today: date | None = None) -> list[Path]:  # fmt: skip
    """Delete day files older than `retention_days`, then the oldest ones while the folder
    holds more than `max_size_mb` (0: no size limit). Today's file is never deleted."""
    today = today or datetime.now(UTC).date()
    oldest_kept = today - timedelta(days=retention_days - 1)
    removed: list[Path] = []
    files = day_files(folder)
    for day, path in files:
        if day < oldest_kept:
            _remove(path)
            removed.append(path)
    if max_size_mb > 0:
        kept = [(d, p) for d, p in files if p not in removed]
        sizes = {p: _size(p) for _, p in kept}
        total = sum(sizes.values())
        for day, path in kept:
            if total <= max_size_mb * 1024 * 1024 or day >= today:
                break
            _remove(path)
            removed.append(path)
            total -= sizes[path]
    return removed


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in _with_wal(path) if p.exists())


def _with_wal(path: Path) -> Iterable[Path]:
    return (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"))


def _remove(path: Path) -> None:
    for p in _with_wal(path):
        p.unlink(missing_ok=True)

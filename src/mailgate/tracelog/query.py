"""Reading the event log: `mailgate trace` (one message's story) and `mailgate status` (the
last hour in numbers). Read-only connections: works while the server runs and when it is down.

Must not: write to the log or import anything from mailgate but `config` and `tracelog`.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailgate.tracelog.store import connect, day_files, normalise

MAX_MESSAGES = 200  # a query matching more (a busy sender's address) shows the newest ones
_FINAL = {"removed"}


@dataclass(slots=True)
class MessageTrace:
    """Every event of one message, oldest first."""

    qid: str
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def first(self) -> dict[str, Any]:
        return self.events[0] if self.events else {}

    @property
    def status(self) -> str:
        """delivered, bounced, partly bounced, rejected, deleted, queued (still in the spool)."""
        kinds = [e["kind"] for e in self.events]
        if "rejected" in kinds:
            return "rejected"
        if "deleted" in kinds:
            return "deleted"  # by the operator (`mailgate queue delete`)
        finals: dict[str, str] = {}
        for e in self.events:
            if e["kind"] in ("delivered", "bounced", "deferred"):
                finals[str(e.get("to", ""))] = e["kind"]
        if not _FINAL.intersection(kinds):
            return "queued"
        states = set(finals.values())
        if states == {"delivered"}:
            return "delivered"
        if states == {"bounced"}:
            return "bounced"
        if "bounced" in states:
            return "partly bounced"
        return "removed"  # every recipient final without a recorded try

    def to_json(self) -> dict[str, Any]:
        return {"qid": self.qid, "status": self.status, "events": self.events}


def find(folder: Path, query: str, *, limit: int = MAX_MESSAGES) -> list[MessageTrace]:
    """The messages whose queue id, Message-ID, sender, recipient or login is `query`."""
    key = normalise(query)
    files = [path for _, path in reversed(day_files(folder))]  # newest first
    qids: list[str] = []
    seen: set[str] = set()
    for conn in _open(files):
        # Queue ids sort by time (spool/ids.py): the newest first, at most `limit`.
        rows = conn.execute(
            "SELECT qid FROM key WHERE k = ? ORDER BY qid DESC LIMIT ?", (key, limit)
        )
        for (qid,) in rows:
            if qid not in seen:
                seen.add(qid)
                qids.append(qid)
        if len(qids) >= limit:
            break
    qids = qids[:limit]
    traces = {qid: MessageTrace(qid) for qid in qids}
    if not qids:
        return []
    marks = ",".join("?" * len(qids))
    for conn in _open(files):
        rows = conn.execute(
            f"SELECT at, qid, kind, data FROM event WHERE qid IN ({marks})",  # noqa: S608
            qids,
        )
        for at, qid, kind, data in rows:
            traces[qid].events.append({"at": at, "kind": kind, **json.loads(data)})
    out = [t for t in traces.values() if t.events]
    for t in out:
        t.events.sort(key=lambda e: float(e["at"]))
    out.sort(key=lambda t: float(t.events[0]["at"]))
    return out


@dataclass(slots=True)
class Summary:
    """The last hour (or any window) of the log, for `mailgate status`."""

    since: float
    counts: dict[str, int]
    top_logins: list[tuple[str, int, int]]  # login, messages, recipients
    top_networks: list[tuple[str, int, int]]  # client network, messages, recipients


def summarise(folder: Path, since: float, *, top: int = 10) -> Summary:
    """accepted, refused, delivered, deferred, bounced since the minute of `since` (Unix
    time); the top senders by login and by client network (/24, /64) among the accepted
    messages. Reads the per-minute roll-ups (store.py), not the events."""
    minute = int(since // 60)
    counts: Counter[str] = Counter()
    tops: dict[str, Counter[str]] = {"login": Counter(), "net": Counter()}
    rcpts: dict[str, Counter[str]] = {"login": Counter(), "net": Counter()}
    for conn in _open((path for _, path in day_files(folder)), table="minute_sender"):
        for kind, n in conn.execute(
            "SELECT kind, sum(n) FROM minute_count WHERE minute >= ? GROUP BY kind", (minute,)
        ):
            counts[kind] += n
        rows = conn.execute(
            "SELECT axis, who, sum(messages), sum(rcpts) FROM minute_sender WHERE minute >= ?"
            " GROUP BY axis, who",
            (minute,),
        )
        for axis, who, n, r in rows:
            tops[axis][who] += n
            rcpts[axis][who] += r
    return Summary(
        since=since,
        counts={
            "accepted": counts["accepted"],
            "refused": counts["refused"] + counts["rejected"],
            "delivered": counts["delivered"],
            "deferred": counts["deferred"],
            "bounced": counts["bounced"],
        },
        top_logins=[(k, n, rcpts["login"][k]) for k, n in tops["login"].most_common(top)],
        top_networks=[(k, n, rcpts["net"][k]) for k, n in tops["net"].most_common(top)],
    )


# The kinds `summarise` and `traffic` report, from the kinds the stages record.
_REPORTED = {
    "accepted": ("accepted",),
    "refused": ("refused", "rejected"),
    "delivered": ("delivered",),
    "deferred": ("deferred",),
    "bounced": ("bounced",),
}


def traffic(folder: Path, since: float, until: float, *, step: int = 3600) -> list[dict[str, int]]:
    """accepted, refused, delivered, deferred, bounced per `step` seconds from `since` to
    `until` (Unix times; `since` rounded down to its minute), oldest first, empty buckets
    included: the operator page's chart. Reads the per-minute roll-ups, like `summarise`."""
    first = int(since // 60)
    per_bucket = max(1, step // 60)
    count = max(1, -(-(int(until // 60) + 1 - first) // per_bucket))
    buckets = [dict.fromkeys(_REPORTED, 0) for _ in range(count)]
    kind_of = {recorded: name for name, kinds in _REPORTED.items() for recorded in kinds}
    for conn in _open((path for _, path in day_files(folder)), table="minute_count"):
        rows = conn.execute(
            "SELECT minute, kind, n FROM minute_count WHERE minute >= ? AND minute <= ?",
            (first, int(until // 60)),
        )
        for minute, kind, n in rows:
            if kind in kind_of:
                buckets[(minute - first) // per_bucket][kind_of[kind]] += n
    return buckets


def _open(paths: Iterable[Path], table: str = "key") -> Iterator[sqlite3.Connection]:
    """A read-only connection to each day file in turn, closed after use; a file a writer has
    just created and not yet given its tables is skipped (it holds no event yet)."""
    for path in paths:
        with contextlib.closing(connect(path, write=False)) as conn:
            tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE name = ?", (table,))
            if tables.fetchone()[0]:
                yield conn

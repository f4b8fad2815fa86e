"""The service's figures, for `mailgate status` and the operator pages: one gathering, two
renderings (cli/status.py prints them; web/operator.py draws them).

Owns: the queue by state with its oldest entries and the held ones (from the spool), the
last hour's traffic and top senders and the last day's traffic by hour (from the event log),
and the suspended accounts (from the directory). Must not: change anything it reads, or
render (no text, no HTML).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from pathlib import Path

from mailgate.directory import Directory
from mailgate.errors import SpoolError
from mailgate.spool.api import SpoolStore
from mailgate.spool.entry import QUEUE_STATES, Envelope, queue_state, utcnow
from mailgate.tracelog.query import Summary, summarise, traffic

HOUR = timedelta(hours=1)
DAY = timedelta(hours=24)


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """One spool entry as the operator pages list it (subject from its header section)."""

    qid: str
    state: str
    received_at: datetime
    mail_from: str
    recipients: tuple[str, ...]
    login: str
    client: str
    size: int
    attempts: int
    last_reply: str
    subject: str


@dataclass(slots=True)
class QueueFigures:
    """counts: entries per state (QUEUE_STATES). oldest: per state, the oldest entries (at most
    `shown` each). held: the held entries, oldest first (at most `shown`)."""

    counts: dict[str, int]
    oldest_seconds: int
    oldest: dict[str, list[QueuedMessage]] = field(default_factory=dict)


@dataclass(slots=True)
class Overview:
    now: datetime
    queue: QueueFigures
    last_hour: Summary
    by_hour: list[dict[str, int]]  # the last 24 hours, oldest first (tracelog.query.traffic)
    by_hour_start: float  # Unix time of the first bucket
    suspended: list[str]


def queue_figures(store: SpoolStore, now: datetime, *, shown: int = 0) -> QueueFigures:
    """Every entry counted by state; the `shown` oldest of each state described (ids() is
    oldest first, so the description stops early)."""
    counts = dict.fromkeys(QUEUE_STATES, 0)
    oldest_at = now
    described: dict[str, list[QueuedMessage]] = {state: [] for state in QUEUE_STATES}
    for qid in store.ids():
        try:
            env = store.load(qid)
        except SpoolError:  # removed meanwhile (NotFound), or unreadable: not in the queue
            continue
        state = queue_state(env, now)
        counts[state] += 1
        oldest_at = min(oldest_at, env.received_at)
        if len(described[state]) < shown:
            described[state].append(_describe(store, env, state))
    return QueueFigures(counts, int((now - oldest_at).total_seconds()), described)


def _describe(store: SpoolStore, env: Envelope, state: str) -> QueuedMessage:
    try:
        head = store.read_headers(env.id, limit=64 * 1024)
    except SpoolError:
        head = b""
    subject = str(BytesHeaderParser(policy=default_policy).parsebytes(head).get("subject", ""))
    replies = [r.last_reply for r in env.recipients if r.last_reply]
    return QueuedMessage(
        qid=env.id,
        state=state,
        received_at=env.received_at,
        mail_from=env.mail_from,
        recipients=tuple(r.address for r in env.recipients),
        login=env.login,
        client=env.client,
        size=env.size,
        attempts=max((r.attempts for r in env.recipients), default=0),
        last_reply=replies[-1] if replies else "",
        subject=subject,
    )


def suspended_logins(directory: Directory) -> list[str]:
    """Accounts the breaker (or an operator) suspended."""
    return sorted(u.login for u in directory.list_users() if u.suspended)


def last_hour(trace: Path, *, top: int = 10) -> Summary:
    return summarise(trace, time.time() - HOUR.total_seconds(), top=top)


def overview(
    store: SpoolStore | None, directory: Directory, trace: Path, *, top: int = 10, shown: int = 10
) -> Overview:
    """Everything the operator pages show (blocking: spool, SQLite and the directory)."""
    now = utcnow()
    queue = (queue_figures(store, now, shown=shown) if store is not None
             else QueueFigures(dict.fromkeys(QUEUE_STATES, 0), 0))  # fmt: skip
    until = time.time()
    # 24 whole hours ending with the current one.
    start = (until // 3600) * 3600 - 23 * 3600
    return Overview(
        now=now,
        queue=queue,
        last_hour=last_hour(trace, top=top),
        by_hour=traffic(trace, start, until, step=3600),
        by_hour_start=start,
        suspended=suspended_logins(directory),
    )

"""The message event log: what happened to each message, from acceptance to its final outcome.

Owns: the recording API the stages call with one line each (`accepted`, `rejected`, `refused`,
`outcome`, `dsn`, `removed`), and the background writer that appends batches to the day files
of `tracelog.store`. Nothing is written until `start()` (`mailgate serve` calls it in every
process); before that, and in tests and tools, every call is a no-op.
Must not: block the event loop (events go to a buffer; a thread writes them every half
second), or fail a message: a write error is logged once a minute and the batch dropped.
Must not import anything from mailgate but `config` and `netaddr`.

Keys (what `mailgate trace QUERY` finds a message by): its queue id, Message-ID, envelope
sender, every recipient, the login; a DSN's entry is also found by the queue id of the
message it reports on.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from datetime import date
from pathlib import Path

from mailgate.config import TraceConfig
from mailgate.netaddr import network_of, parse_address
from mailgate.tracelog.store import Event, append, connect, day_of, day_path, normalise, prune

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.5  # seconds between two batches
MAX_BUFFERED = 200_000  # events kept while the disk does not take them; then the oldest go
_ERROR_LOG_INTERVAL = 60.0


class Writer:
    """A buffer and the thread that appends it; one per process (see `_after_fork`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._buffer: list[Event] = []
        self._wake = threading.Event()
        self._stop = False
        self._conns: dict[date, sqlite3.Connection] = {}
        self._next_error_log = 0.0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="tracelog", daemon=True)
        self._thread.start()

    def add(self, event: Event) -> None:
        with self._lock:
            if len(self._buffer) >= MAX_BUFFERED:
                del self._buffer[: MAX_BUFFERED // 10]
                self.dropped += MAX_BUFFERED // 10
            self._buffer.append(event)

    def close(self) -> None:
        """Write what is buffered and stop the thread (bounded: a stuck disk is not waited for)."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while True:
            self._wake.wait(FLUSH_INTERVAL)
            self._wake.clear()
            self._flush()
            if self._stop:
                break
        for conn in self._conns.values():
            conn.close()

    def _flush(self) -> None:
        with self._lock:
            batch, self._buffer = self._buffer, []
        if not batch:
            return
        by_day: dict[date, list[Event]] = {}
        for event in batch:
            by_day.setdefault(day_of(event.at), []).append(event)
        for day, events in by_day.items():
            try:
                conn = self._conns.get(day)
                if conn is None:
                    for old in self._conns.values():  # yesterday's file is finished
                        old.close()
                    self._conns.clear()
                    conn = self._conns[day] = connect(day_path(self.folder, day), write=True)
                append(conn, events)
            except Exception as e:  # the log must never stop the mail
                self._conns.pop(day, None)
                now = time.monotonic()
                if now >= self._next_error_log:
                    self._next_error_log = now + _ERROR_LOG_INTERVAL
                    log.warning("trace events not written folder=%s events=%d: %s "
                                "(logged once a minute)", self.folder, len(events), e)  # fmt: skip


_writer: Writer | None = None
_writer_pid = 0


def start(cfg: TraceConfig) -> None:
    """Record from now on in this process (called after the fork, in every process)."""
    global _writer, _writer_pid
    stop()
    _writer = Writer(cfg.path)
    _writer_pid = os.getpid()


def stop() -> None:
    global _writer
    if _writer is not None and _writer_pid == os.getpid():
        _writer.close()
    _writer = None


def _after_fork() -> None:
    # A forked child inherits the parent's writer without its thread (and maybe with a held
    # lock): it must start its own, never touch that one.
    global _writer
    _writer = None


os.register_at_fork(after_in_child=_after_fork)


def prune_old(cfg: TraceConfig) -> None:
    """Apply `[trace] retention_days` and `max_size_mb` (the supervisor, hourly)."""
    for path in prune(cfg.path, retention_days=cfg.retention_days, max_size_mb=cfg.max_size_mb):
        log.info("trace day file removed path=%s (retention)", path)


def _record(kind: str, qid: str, keys: Iterable[str], **data: object) -> None:
    if _writer is None:
        return
    _writer.add(Event(time.time(), qid, kind, tuple({normalise(k) for k in keys if k}), data))


# --- what the stages record ------------------------------------------------------------------


def accepted(qid: str, *, mail_from: str, rcpts: Iterable[str], size: int, login: str,
             service: str, client: str, sid: str, message_id: str) -> None:  # fmt: skip
    """The message is on disk and 250 was given (accept.py)."""
    to = list(rcpts)
    _record("accepted", qid, [qid, mail_from, *to, login, message_id], sid=sid,
            service=service, client=client, net=network(client), login=login,
            mail_from=mail_from, to=to, size=size, message_id=message_id)  # fmt: skip


def network(client: str) -> str:
    """The client's network for `status`' abuse view: /24 (IPv4) or /64 (IPv6), computed
    once here so that the last hour is grouped by SQLite, not parsed again per query. An
    IPv4-mapped address counts as IPv4 (netaddr, the rule the rate limits group by too)."""
    address = parse_address(client)
    if address is None:
        return client or "unknown"
    return network_of(address, 24, 64)


def rejected(qid: str, *, mail_from: str, rcpts: Iterable[str], login: str, service: str,
             client: str, sid: str, reply: str) -> None:  # fmt: skip
    """The end of DATA was refused (virus, blocked type, policy, spool...): no 250."""
    to = list(rcpts)
    _record("rejected", qid, [qid, mail_from, *to, login], sid=sid, service=service,
            client=client, login=login, mail_from=mail_from, to=to, reply=reply)  # fmt: skip


def refused(*, command: str, address: str, login: str, service: str, client: str, sid: str,
            reply: str) -> None:  # fmt: skip
    """A command of a transaction was refused (MAIL, RCPT, DATA): no message exists yet.
    Counted by `mailgate status`; not a message, so not found by `trace`."""
    _record("refused", "", (), sid=sid, service=service, client=client, login=login,
            command=command, address=address, reply=reply)  # fmt: skip


def queued(qid: str, *, mail_from: str, rcpts: Iterable[str], service: str, about: str) -> None:
    """An entry mailgate made itself (a DSN about message `about`)."""
    to = list(rcpts)
    _record("queued", qid, [qid, *to, about], service=service, mail_from=mail_from, to=to,
            about=about)  # fmt: skip


def outcome(qid: str, *, status: str, rcpt: str, relay: str, reply: str, tls: bool,
            delay: float) -> None:  # fmt: skip
    """One recipient's try: status delivered, deferred or bounced (deliver/engine.py)."""
    _record(status, qid, (), to=rcpt, relay=relay, reply=reply, tls=tls, delay=round(delay, 3))


def dsn(qid: str, *, action: str, dsn_qid: str, to: str) -> None:
    """A delivery status notification about `qid` was queued as `dsn_qid`."""
    _record("dsn", qid, (), action=action, dsn_qid=dsn_qid, to=to)


def by_operator(qid: str, action: str) -> None:
    """`mailgate queue hold|release|delete ID`: action held, released or deleted."""
    _record(action, qid, ())


def removed(qid: str) -> None:
    """The entry left the spool: every recipient is final."""
    _record("removed", qid, ())

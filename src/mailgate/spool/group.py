"""Group commit: many concurrent sessions share the write and fdatasync of one batch.

Owns: batching `SpoolStore.commit_batch()` calls for asyncio sessions, on one committer thread.
Must not: touch spool files itself (journal.py does), or block the event loop on disk I/O.

How it works: a committer thread (started by the first commit, gone after a second without
work) takes everything queued so far as one batch, writes it with `commit_batch()` (one write,
one fdatasync) and hands the results back with one `call_soon_threadsafe()` per batch. The
event loop wakes the thread only when it is idle: commits that arrive while a batch is on its
way to disk just join the queue and form the next batch, at no cost to the loop. So a lone
session pays no waiting, and a busy server pays one wake-up each way per batch, not a Task,
an executor job and a context copy per batch as `asyncio.to_thread()` would (issue #19).
A commit's result is that entry's own: one entry's SpoolFull does not fail its neighbours
unless the cause is shared (the fdatasync). commit() returns only after its entry is on disk
(RFC 5321 §6.1: the 250 may be sent then).

If the awaiting session is cancelled (client gone, server stopping) before its batch finishes,
no 250 can be sent, so its sender still owns the message: the entry is removed again (on the
committer thread) rather than risk a duplicate that the sender will also retry.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass

from mailgate.errors import SpoolError
from mailgate.spool.api import SpoolStore
from mailgate.spool.entry import Envelope
from mailgate.spool.incoming import Incoming

log = logging.getLogger(__name__)

MAX_BATCH = 256  # bounds one batch's latency; the rest waits for the next
IDLE_EXIT = 1.0  # seconds without work after which the thread ends (the next commit restarts it)


@dataclass(slots=True)
class _Request:
    incoming: Incoming
    envelope: Envelope
    prefix: bytes
    future: asyncio.Future[Envelope]


class GroupCommitter:
    """Batches commits from concurrent sessions onto one SpoolStore, on one committer thread."""

    def __init__(self, store: SpoolStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        # Wakes the idle thread: SimpleQueue is C code on both sides (a Condition's notify is
        # Python and showed in the workers' profile).
        self._bell: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._queue: list[_Request] = []
        self._orphans: list[str] = []  # committed for a session that was cancelled meanwhile
        self._thread: threading.Thread | None = None
        self._idle = True  # the thread waits for work (only then does a commit notify it)
        self._kick_due = False  # a wake-up is scheduled on the event loop
        # Commits handed in and not yet settled (orphans count until removed), for drain().
        self._unsettled = 0
        self._drainers: list[asyncio.Future[None]] = []
        self.batches = 0  # batches written so far (for tests and the benchmark)

    async def commit(self, incoming: Incoming, envelope: Envelope, prefix: bytes = b"") -> Envelope:
        """Like `SpoolStore.commit()`, batched with concurrent callers and off the event loop."""
        # Claim it here, in the event loop: a session that is cancelled meanwhile and aborts
        # its incoming message must not touch the files the committer thread is writing.
        self.store.prepare_commit(incoming, envelope)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Envelope] = loop.create_future()
        with self._lock:
            self._queue.append(_Request(incoming, envelope, prefix, future))
            self._unsettled += 1
            if (self._thread is None or self._idle) and not self._kick_due:
                # Wake the thread once the loop has run what is ready now: the commits of the
                # other sessions in this pass of the loop join the same batch.
                self._kick_due = True
                loop.call_soon(self._kick_soon)
        return await future

    def _kick_soon(self) -> None:
        with self._lock:
            self._kick_due = False
            self._kick()

    async def drain(self) -> None:
        """Wait until every commit handed in so far is settled (e.g. before shutting down)."""
        with self._lock:
            if self._unsettled == 0:
                return
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._drainers.append(waiter)
        await asyncio.shield(waiter)

    # -- the committer thread --------------------------------------------------------------

    def _run(self) -> None:
        # Bounded: it ends after IDLE_EXIT without work; each pass settles at least one request.
        while True:
            with self._lock:
                idle = not self._queue and not self._orphans
                if idle:
                    self._idle = True
                else:
                    batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                    orphans, self._orphans = self._orphans, []
            if idle:
                try:
                    self._bell.get(timeout=IDLE_EXIT)
                except queue.Empty:
                    with self._lock:
                        if self._idle:  # no commit came meanwhile: the next one starts a thread
                            self._thread = None
                            return
                continue  # (a bell left over from a race only costs one more look)
            if orphans:
                self._remove_orphans(orphans)
                self._settled(len(orphans))
            if batch:
                self._write(batch)

    def _write(self, batch: list[_Request]) -> None:
        items = [(r.incoming, r.envelope, r.prefix) for r in batch]
        results: list[Envelope | Exception]
        try:
            results = self.store.commit_batch(items)
        except Exception as e:  # commit_batch itself broke (a bug): fail every waiter
            log.exception("group commit batch failed")
            results = [SpoolError(f"group commit failed: {e!r}")] * len(batch)
        self.batches += 1
        loops: dict[asyncio.AbstractEventLoop, list[int]] = {}
        for n, request in enumerate(batch):
            loops.setdefault(request.future.get_loop(), []).append(n)
        for loop, picks in loops.items():
            mine = [(batch[n], results[n]) for n in picks]
            try:
                loop.call_soon_threadsafe(self._settle, mine)
            except RuntimeError:  # that loop is closed: nobody waits for these any more
                self._orphaned([r.id for _, r in mine if isinstance(r, Envelope)])
                self._settled(sum(not isinstance(r, Envelope) for _, r in mine))

    def _remove_orphans(self, qids: list[str]) -> None:
        for qid in qids:
            try:
                self.store.remove(qid)
            except SpoolError as e:
                log.warning("qid=%s could not remove unacknowledged entry: %s", qid, e)
            else:
                log.info("qid=%s removed: session cancelled before commit returned", qid)

    # -- either side ---------------------------------------------------------------------------

    def _settle(self, done: list[tuple[_Request, Envelope | Exception]]) -> None:
        """On the event loop: give each session its result."""
        orphans: list[str] = []
        for request, result in done:
            if request.future.done():  # cancelled while on its way to disk
                if isinstance(result, Envelope):
                    orphans.append(result.id)
                    continue
            elif isinstance(result, Envelope):
                request.future.set_result(result)
            else:
                request.future.set_exception(result)
        self._orphaned(orphans)
        self._settled(len(done) - len(orphans))

    def _orphaned(self, qids: list[str]) -> None:
        if not qids:
            return
        with self._lock:
            self._orphans.extend(qids)
            self._kick()

    def _kick(self) -> None:
        """Under the lock: make sure the thread will look at the queue (a wake-up only when
        it is idle; a busy thread takes the queue after its batch anyway)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="spool-group-commit", daemon=True
            )
            self._idle = False
            self._thread.start()
        elif self._idle:
            self._idle = False
            self._bell.put(None)

    def _settled(self, count: int) -> None:
        if count == 0:
            return
        with self._lock:
            self._unsettled -= count
            if self._unsettled or not self._drainers:
                return
            drainers, self._drainers = self._drainers, []
        for waiter in drainers:
            waiter.get_loop().call_soon_threadsafe(_wake, waiter)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)

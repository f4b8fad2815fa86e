"""Group commit: many concurrent sessions share the directory fsyncs of one batch.

Owns: batching `SpoolStore.commit_batch()` calls for asyncio sessions. Must not: touch spool
files itself (journal.py does), or block the event loop on disk I/O.

How it works: the first commit() of an idle committer starts a batch at once (no waiting, so a
lone session pays no latency). Commits that arrive while a batch is being written, in a worker
thread, queue up and form the next batch. Each file is fsynced; each directory once per batch.
A commit's result is that entry's own: one entry's SpoolFull does not fail its neighbours unless
the cause is shared (a directory fsync). commit() returns only after its entry is on disk
(RFC 5321 §6.1: the 250 may be sent then).

If the awaiting session is cancelled (client gone, server stopping) before its batch finishes,
no 250 can be sent, so its sender still owns the message: the entry is removed again rather
than risk a duplicate that the sender will also retry.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from mailgate.errors import SpoolError
from mailgate.spool.api import SpoolStore
from mailgate.spool.entry import Envelope
from mailgate.spool.incoming import Incoming

log = logging.getLogger(__name__)

MAX_BATCH = 256  # bounds one batch's latency; the rest waits for the next


@dataclass(slots=True)
class _Request:
    incoming: Incoming
    envelope: Envelope
    prefix: bytes
    future: asyncio.Future[Envelope]


class GroupCommitter:
    """Batches commits from concurrent sessions of one event loop onto one SpoolStore."""

    def __init__(self, store: SpoolStore) -> None:
        self.store = store
        self._queue: list[_Request] = []
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0  # batches written so far (for tests and the benchmark)

    async def commit(self, incoming: Incoming, envelope: Envelope, prefix: bytes = b"") -> Envelope:
        """Like `SpoolStore.commit()`, batched with concurrent callers and off the event loop."""
        # Claim it here, in the event loop: a session that is cancelled meanwhile and aborts
        # its incoming message must not touch the files the worker thread is writing.
        self.store.prepare_commit(incoming, envelope)
        loop = asyncio.get_running_loop()
        request = _Request(incoming, envelope, prefix, loop.create_future())
        self._queue.append(request)
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run(), name="spool-group-commit")
        return await request.future

    async def drain(self) -> None:
        """Wait until every commit handed in so far is finished (e.g. before shutting down)."""
        # The running worker also takes the commits that arrive while it writes, so waiting for
        # it covers everything handed in before this call.
        if self._worker is not None and not self._worker.done():
            await asyncio.shield(self._worker)

    async def _run(self) -> None:
        # Bounded: every pass removes at least one request, and requests only arrive from
        # sessions, each of which waits for its own result before committing again.
        while self._queue:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            await self._write(batch)

    async def _write(self, batch: list[_Request]) -> None:
        items = [(r.incoming, r.envelope, r.prefix) for r in batch]
        try:
            results = await asyncio.to_thread(self.store.commit_batch, items)
        except BaseException as e:  # the worker thread itself broke: fail every waiter
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(SpoolError(f"group commit failed: {e!r}"))
            if isinstance(e, asyncio.CancelledError):
                raise
            log.exception("group commit batch failed")
            return
        self.batches += 1
        orphans: list[str] = []
        for request, result in zip(batch, results, strict=True):
            if request.future.done():  # cancelled while on its way to disk
                if isinstance(result, Envelope):
                    orphans.append(result.id)
            elif isinstance(result, Envelope):
                request.future.set_result(result)
            else:
                request.future.set_exception(result)
        if orphans:
            await asyncio.to_thread(self._remove_orphans, orphans)

    def _remove_orphans(self, qids: list[str]) -> None:
        for qid in qids:
            try:
                self.store.remove(qid)
            except SpoolError as e:
                log.warning("qid=%s could not remove unacknowledged entry: %s", qid, e)
            else:
                log.info("qid=%s removed: session cancelled before commit returned", qid)

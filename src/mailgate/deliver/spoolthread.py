"""The delivery engine's spool calls, on one thread with batched wake-ups (issue #19).

Owns: running off the event loop the spool calls the engine makes for every message (loading
new envelopes, recording outcomes, removing delivered entries), which may wait for the
journal's flock (a worker's commit holds it through its fdatasync) and for the disk. Must not:
decide anything about delivery, or touch spool files except through `SpoolStore`.

Why not `asyncio.to_thread()` per call: each costs an executor job, a context copy, two futures
and a wake-up of the event loop through its self-pipe, and the engine made one per delivered
message for its removal alone (with the envelope loads, 17 % of the supervisor's samples under
load). Here one thread takes everything queued so far as one batch: consecutive updates and
removals go to the store as one `SpoolStore.change_batch()` (one flock, one write, and one
fdatasync when an update is among them), and the results go back with one
`call_soon_threadsafe()` per batch. The event loop wakes the thread only when it is idle, once
per pass of the loop, so the requests of one pass share a batch (spool/group.py's committer
does the same for commits).

Order and durability: requests run in the order they were made (one queue, one thread), so an
entry's update and its removal reach the journal in that order; each is as durable when its
caller resumes as the store's own `update()` and `remove()` make it. A request whose caller was
cancelled meanwhile still runs: the outcome of a delivery is recorded even when nobody waits
for the answer any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from mailgate.errors import SpoolError
from mailgate.spool.api import SpoolStore
from mailgate.spool.entry import Envelope

log = logging.getLogger(__name__)

MAX_BATCH = 256  # bounds one batch's latency; the rest waits for the next
IDLE_EXIT = 1.0  # seconds without work after which the thread ends (the next call restarts it)

_T = TypeVar("_T")
Change = Callable[[Envelope], Envelope]


@dataclass(slots=True)
class _Request:
    """An update (`change`), a removal (`change` None), or with `call` a plain call."""

    future: asyncio.Future[Any]
    qid: str = ""
    change: Change | None = None
    call: Callable[[], Any] | None = None


class SpoolThread:
    """Runs one SpoolStore's calls for an event loop on one thread, batching changes."""

    def __init__(self, store: SpoolStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        # Wakes the idle thread (C on both sides, unlike a Condition).
        self._bell: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._queue: list[_Request] = []
        self._thread: threading.Thread | None = None
        self._idle = True  # the thread waits for work (only then is it woken)
        self._kick_due = False  # a wake-up is scheduled on the event loop
        self.batches = 0  # batches run so far (for tests)
        self.changes = 0  # updates and removals handed to the store so far (for tests)

    async def update(self, qid: str, change: Change) -> Envelope:
        """`SpoolStore.update()`, batched with the other changes queued meanwhile."""
        return cast(Envelope, await self._submit(qid, change, None))

    async def remove(self, qid: str) -> None:
        """`SpoolStore.remove()`, batched with the other changes queued meanwhile."""
        await self._submit(qid, None, None)

    async def call(self, fn: Callable[[], _T]) -> _T:
        """`fn()` on the thread, in order with the changes."""
        return cast(_T, await self._submit("", None, fn))

    def _submit(
        self, qid: str, change: Change | None, call: Callable[[], Any] | None
    ) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            self._queue.append(_Request(future, qid, change, call))
            if (self._thread is None or self._idle) and not self._kick_due:
                # Once the loop has run what is ready now: the requests of this pass of the
                # loop join the same batch.
                self._kick_due = True
                loop.call_soon(self._kick_soon)
        return future

    def _kick_soon(self) -> None:
        with self._lock:
            self._kick_due = False
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="deliver-spool", daemon=True)
                self._idle = False
                self._thread.start()
            elif self._idle:
                self._idle = False
                self._bell.put(None)

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        # Bounded: it ends after IDLE_EXIT without work; each pass settles at least one request.
        while True:
            with self._lock:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                if not batch:
                    self._idle = True
            if not batch:
                try:
                    self._bell.get(timeout=IDLE_EXIT)
                except queue.Empty:
                    with self._lock:
                        if self._idle:  # nothing came meanwhile: the next request starts one
                            self._thread = None
                            return
                continue  # (a bell left over from a race only costs one more look)
            outcomes = self._work(batch)
            self.batches += 1
            self._hand_back(batch, outcomes)

    def _work(self, batch: list[_Request]) -> list[tuple[bool, Any]]:
        """Each request's outcome, in order: (True, result) or (False, exception)."""
        out: list[tuple[bool, Any]] = []
        i = 0
        while i < len(batch):  # bounded: every pass takes at least one request
            call = batch[i].call
            if call is not None:
                try:
                    out.append((True, call()))
                except Exception as e:
                    out.append((False, e))
                i += 1
                continue
            j = i
            while j < len(batch) and batch[j].call is None:
                j += 1
            run = batch[i:j]
            results: list[Envelope | Exception | None]
            try:
                results = self.store.change_batch([(r.qid, r.change) for r in run])
            except Exception as e:  # change_batch itself broke (a bug): fail these requests
                log.exception("spool change batch failed")
                results = [SpoolError(f"qid={r.qid}: change failed: {e!r}") for r in run]
            self.changes += len(run)
            out.extend((not isinstance(r, Exception), r) for r in results)
            i = j
        return out

    def _hand_back(self, batch: list[_Request], outcomes: list[tuple[bool, Any]]) -> None:
        loops: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for request, (ok, value) in zip(batch, outcomes, strict=True):
            future = request.future
            loops.setdefault(future.get_loop(), []).append((future, ok, value))
        for loop, settled in loops.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, settled)


def _settle(settled: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    """On the event loop: each caller's result (a cancelled caller's is dropped)."""
    for future, ok, value in settled:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

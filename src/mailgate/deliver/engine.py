"""The delivery engine: takes committed spool entries to the recipients' servers.

Owns: the in-memory schedule (a heap of entries by next attempt), grouping pending recipients
by destination, the connection pools (a global and a per-destination limit; connections are
reused for further messages to the same destination), recording every try per recipient in
the spool, retries, expiry, delay warnings, bounces and success notices, and the one-line
delivery log. Must not: parse SMTP itself (attempt.py), resolve names (route.py), build DSN
text (bounce.py), do retry maths (schedule.py), or touch spool files except through `SpoolStore`.

Durability (STYLE.md §5): the spool is the truth. Every try's outcome is written with
`SpoolStore.update` (or the removal) before the next message is sent on that connection (on
spoolthread.py's thread, batched with the other connections' changes), so after a crash (kill -9
at any moment) the engine picks everything up again from the spool, and a recipient whose
server accepted the message and whose outcome was recorded is never sent it again. An entry
whose recipients are all final is finished (bounce queued first, then removed), also when the
crash happened between the two. The only duplicate an MTA cannot rule out is a reply lost
after the final dot (RFC 1047).

RFCs: 5321 §4.5.4 (retries), §4.5.5 and §6.1 (DSNs from the null sender, never a bounce for
a bounce), 3461 (NOTIFY SUCCESS/FAILURE/DELAY/NEVER), 3464 (the DSN format, bounce.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import Any

from mailgate import metrics, replies, tracelog
from mailgate.config import Config
from mailgate.deliver import bounce, schedule, tlsrpt
from mailgate.deliver.attempt import (
    ConnectFailure,
    Connection,
    RecipientResult,
    Status,
    StoredMessage,
    Transfer,
    status_of_reply,
)
from mailgate.deliver.route import Host, Route, RouteError, Router
from mailgate.deliver.spoolthread import SpoolThread
from mailgate.deliver.tlspolicy import (
    REQUIRETLS_UNSUPPORTED,
    TlsPolicy,
    expired_status,
    is_own_diagnostic,
)
from mailgate.deliver.tlsrpt import Reporter, Session, result_type
from mailgate.errors import SpoolError
from mailgate.smtp.events import SMARTHOST, SUBMISSION, SUBMISSIONS
from mailgate.spool.api import NotFound, SpoolStore, header_section
from mailgate.spool.entry import QUEUE_STATES, Attempt, Envelope, Recipient, queue_state, utcnow
from mailgate.spool.ids import new_queue_id

log = logging.getLogger("mailgate.deliver")

POLL_INTERVAL = 1.0  # seconds between two looks at spool/wakeup (a cheap stat)
IDLE_KEEP = 2.0  # seconds an idle connection waits for another message (Postfix: 2 s)
MAX_TRANSACTIONS_PER_CONNECTION = 1000  # then QUIT and reconnect, bounding one session
MAX_HISTORY = 100  # attempts kept per recipient for `queue show`
STOP_GRACE = 10.0  # seconds stop() lets transactions in flight finish
# Messages up to this size are read once per try and shared by the entry's jobs; larger ones
# are streamed from the spool by the connection that sends them (read in a worker thread a
# chunk at a time), so memory stays bounded whatever the message size.
CACHED_MESSAGE = 64 * 1024
# Entries being worked on at once; the rest of a backlog waits on the heap, so that a queue of
# 100 000 messages costs envelopes in memory, not message bodies or tasks.
MAX_ACTIVE_ENTRIES = 2000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EXPIRED_STATUS = "4.4.7"  # RFC 3463: delivery time expired
# Entries whose message came over SMTP: DATA refused bare CR and bare LF (smtp/data.py), and
# accept.py put its new header section in front of the received body unchanged, so after the
# header section CR and LF come only as CRLF (the encoder then only dot-stuffs; see
# _clean_from).
_RECEIVED_OVER_SMTP = frozenset(p.name for p in (SUBMISSION, SUBMISSIONS, SMARTHOST))


@dataclass(frozen=True, slots=True)
class _Key:
    """Messages that may share connections: one destination (a domain or the relay) and the
    same TLS demands (RFC 8689: a REQUIRETLS message needs a verified session to a next hop
    that offers REQUIRETLS; a `TLS-Required: No` message may use hosts that others may not)."""

    domain: str
    requiretls: bool = False
    tls_optional: bool = False

    def __str__(self) -> str:
        return self.domain


@dataclass(slots=True)
class _Job:
    """Some pending recipients of one entry, for one destination."""

    qid: str
    destination: _Key
    recipients: tuple[Recipient, ...]


@dataclass(slots=True)
class _Destination:
    """The jobs waiting for one destination and the workers (connections) serving it."""

    key: _Key
    jobs: deque[_Job] = field(default_factory=deque)
    workers: int = 0
    idle: int = 0
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)


class Engine:
    """Delivers everything in the spool; `run()` until `stop()`.

    `now` and `rng` are injectable so that tests drive time and jitter instead of waiting.
    """

    def __init__(
        self,
        cfg: Config,
        store: SpoolStore,
        *,
        now: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.dcfg = cfg.delivery
        self.store = store
        # Loads, updates and removals: one thread, batched (a to_thread per message cost more).
        self._spool = SpoolThread(store)
        self.now = now
        self.rng = rng or random.Random()
        self.router = Router(self.dcfg, rng=self.rng, bad_nets=cfg.smarthost.bad_nets)
        self.postmaster = self.dcfg.postmaster or f"postmaster@{cfg.directory.default_domain}"
        self._tls = _client_tls_context()
        self.tlspolicy = TlsPolicy(
            self.dcfg,
            self.router.resolver,
            dnssec=self.router.dnssec,
            state_folder=cfg.spool.path,
            now=now,
            is_refused=self.router.is_refused,
        )
        self.tlsrpt = Reporter(
            cfg.spool.path / "tlsrpt",
            self.router.resolver,
            submitter=cfg.hostname,
            contact=self.postmaster,
        )
        self._reported_on: date | None = None  # the day whose finished days were reported
        self._tlsrpt_saved_at = 0.0
        self._slots = asyncio.Semaphore(self.dcfg.max_connections)
        self._envelopes: dict[str, Envelope] = {}
        self._messages: dict[str, bytes] = {}
        self._active: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._heap: list[tuple[datetime, int, str]] = []
        self._due: dict[str, datetime] = {}
        self._seq = itertools.count()
        self._destinations: dict[_Key, _Destination] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._event = asyncio.Event()
        self._new_qids: set[str] = set()
        self._rescan_new = False
        self._rescan_all = False
        self._stopping = False
        self._stopped = asyncio.Event()

    # --- public API ---------------------------------------------------------------------

    def wake(self, qid: str | None = None) -> None:
        """A new entry was committed: deliver it now. With its qid the engine loads just that
        entry; without, it looks for new entries in the spool (coalesced: one directory
        listing for a burst of wakes)."""
        if qid is not None:
            self._new_qids.add(qid)
        else:
            self._rescan_new = True
        self._event.set()

    async def run(self) -> None:
        """Pick up everything in the spool, then deliver until `stop()`."""
        last_poke = await asyncio.to_thread(self.store.wakeup_mtime)
        await self._load(await asyncio.to_thread(self.store.ids), reload=True)
        loop = asyncio.get_running_loop()
        next_poll = loop.time() + POLL_INTERVAL
        try:
            while not self._stopping:
                await self._dispatch_due()
                await self._wait()
                if self._stopping:
                    break
                if loop.time() >= next_poll:
                    next_poll = loop.time() + POLL_INTERVAL
                    poke = await asyncio.to_thread(self.store.wakeup_mtime)
                    if poke != last_poke:
                        # queue flush/hold/release/delete: their changes are on disk.
                        last_poke = poke
                        self._rescan_all = True
                    await self._tls_reports(loop.time())
                await self._rescan()
        finally:
            with contextlib.suppress(OSError):
                self.tlsrpt.save()
            self._stopped.set()

    async def stop(self) -> None:
        """Stop taking work; let transactions in flight finish (bounded), then cancel."""
        self._stopping = True
        self._event.set()
        for dest in self._destinations.values():
            dest.wakeup.set()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=STOP_GRACE)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=STOP_GRACE)
        await self.tlspolicy.close()

    def queue_snapshot(self) -> tuple[dict[str, int], float]:
        """Entries by state (QUEUE_STATES) and the age in seconds of the oldest (0: empty),
        from memory: cheap enough for every /metrics scrape."""
        now = self.now()
        counts = dict.fromkeys(QUEUE_STATES, 0)
        oldest = now
        for env in self._envelopes.values():
            counts[queue_state(env, now)] += 1
            oldest = min(oldest, env.received_at)
        return counts, (now - oldest).total_seconds()

    # --- the schedule --------------------------------------------------------------------

    async def _wait(self) -> None:
        timeout = POLL_INTERVAL
        if self._heap and len(self._active) < MAX_ACTIVE_ENTRIES:
            until = (self._heap[0][0] - self.now()).total_seconds()
            timeout = max(0.0, min(timeout, until))
        if timeout > 0 and not self._event.is_set():
            # asyncio.timeout, not wait_for: no Task per wait (Python 3.11's wait_for makes one)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._event.wait()
        self._event.clear()

    def _schedule(self, qid: str) -> None:
        """Put an idle entry on the heap at its earliest pending recipient's time."""
        env = self._envelopes.get(qid)
        if env is None or env.held or self._active.get(qid) or not env.pending:
            self._due.pop(qid, None)
            return
        due = min((r.next_attempt_at or EPOCH) for r in env.pending)
        self._due[qid] = due
        heapq.heappush(self._heap, (due, next(self._seq), qid))
        if self._heap[0][2] == qid:
            self._event.set()  # earlier than what the dispatcher is waiting for

    async def _dispatch_due(self) -> None:
        now = self.now()
        started = 0
        while (
            self._heap
            and self._heap[0][0] <= now
            and not self._stopping
            and len(self._active) < MAX_ACTIVE_ENTRIES
        ):
            due, _, qid = heapq.heappop(self._heap)
            if self._due.get(qid) != due:
                continue  # superseded by a later _schedule()
            del self._due[qid]
            self._start(qid, now)
            started += 1
            if started % 500 == 0:
                await asyncio.sleep(0)  # a big backlog must not starve the connections

    async def _rescan(self) -> None:
        if self._rescan_all:
            self._rescan_all = self._rescan_new = False
            self._new_qids.clear()
            ids = await asyncio.to_thread(self.store.ids)
            await self._load(ids, reload=True)
            return
        if self._rescan_new:
            self._rescan_new = False
            ids = await asyncio.to_thread(self.store.ids)
            self._new_qids.update(q for q in ids if q not in self._envelopes)
        if self._new_qids:
            new = [q for q in self._new_qids if q not in self._envelopes]
            self._new_qids.clear()
            await self._load(new, reload=False)

    async def _load(self, ids: Sequence[str], *, reload: bool) -> None:
        """Read envelopes from the spool. With `reload`, `ids` is the whole spool: entries no
        longer in it are forgotten and the others re-read (an operator changed them)."""
        if reload:
            present = set(ids)
            for qid in list(self._envelopes):
                if qid not in present and not self._active.get(qid):
                    self._forget(qid)
        todo = [q for q in ids if not self._active.get(q)]
        loaded = await self._spool.call(partial(self._read_envelopes, todo))
        for env in loaded:
            self._envelopes[env.id] = env
            if env.is_done:
                self._spawn(self._finish_entry(env.id))
            else:
                self._schedule(env.id)

    def _read_envelopes(self, ids: Iterable[str]) -> list[Envelope]:
        out: list[Envelope] = []
        for qid in ids:
            try:
                out.append(self.store.load(qid))
            except NotFound:
                continue  # removed meanwhile
            except SpoolError as e:
                log.error("qid=%s cannot load envelope: %s", qid, e)
        return out

    def _forget(self, qid: str) -> None:
        self._envelopes.pop(qid, None)
        self._messages.pop(qid, None)
        self._due.pop(qid, None)
        self._locks.pop(qid, None)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task failed", exc_info=task.exception())

    # --- one entry -----------------------------------------------------------------------

    def _start(self, qid: str, now: datetime) -> None:
        env = self._envelopes.get(qid)
        if env is None or env.held:
            return
        due = tuple(r for r in env.pending if (r.next_attempt_at or EPOCH) <= now)
        if not due:
            self._schedule(qid)
            return
        self._active[qid] = 1  # the preparation itself; released in _prepare
        self._spawn(self._prepare(qid, env, due))

    async def _prepare(self, qid: str, env: Envelope, due: tuple[Recipient, ...]) -> None:
        try:
            if 0 < env.size <= CACHED_MESSAGE:
                # A small file from the page cache: reading it here is cheaper than a thread.
                head = self._messages[qid] = self.store.read_message(qid)
            else:
                head = await asyncio.to_thread(self.store.read_headers, qid)
        except NotFound:
            self._active.pop(qid, None)
            self._forget(qid)
            return
        except SpoolError as e:
            log.error("qid=%s cannot read message: %s", qid, e)
            self._active.pop(qid, None)
            self._schedule_retry_later(qid)
            return

        hops = _received_count(head)
        if hops > self.dcfg.hop_limit:
            reply = replies.HOP_LIMIT_EXCEEDED
            detail = f"{hops} Received headers, more than the hop limit {self.dcfg.hop_limit}"
            results = [RecipientResult(r.address, "failed", reply, detail) for r in due]
            self._active[qid] = 1
            await self._record(_Job(qid, _Key(""), due), results)
            return

        # RFC 8689 §5: "TLS-Required: No" is ignored when REQUIRETLS was given.
        tls_optional = not env.requiretls and _tls_required_no(head)
        groups: dict[_Key, list[Recipient]] = {}
        for rcpt in due:
            key = _Key(self.router.destination(rcpt.address), env.requiretls, tls_optional)
            groups.setdefault(key, []).append(rcpt)
        self._active[qid] = len(groups)
        for key, rcpts in groups.items():
            self._submit(_Job(qid, key, tuple(rcpts)))

    def _schedule_retry_later(self, qid: str) -> None:
        env = self._envelopes.get(qid)
        if env is None:
            return
        later = self.now() + timedelta(seconds=self.dcfg.retry_schedule[0])
        self._due[qid] = later
        heapq.heappush(self._heap, (later, next(self._seq), qid))

    # --- destinations and connections ----------------------------------------------------

    def _submit(self, job: _Job) -> None:
        dest = self._destinations.get(job.destination)
        if dest is None:
            dest = self._destinations[job.destination] = _Destination(job.destination)
        dest.jobs.append(job)
        if dest.idle:
            dest.wakeup.set()
        # One more connection when nobody is idle and the backlog exceeds what the open
        # connections will soon take, up to the per-destination limit.
        if (
            dest.idle == 0
            and dest.workers < self.dcfg.max_per_destination
            and (dest.workers == 0 or len(dest.jobs) > dest.workers)
        ):
            dest.workers += 1
            self._spawn(self._worker(dest))

    async def _next_job(self, dest: _Destination) -> _Job | None:
        """The next job for this destination, waiting up to IDLE_KEEP for one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + IDLE_KEEP
        while not dest.jobs and not self._stopping:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            dest.idle += 1
            dest.wakeup.clear()
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):  # no Task per wait, unlike wait_for
                        await dest.wakeup.wait()
            finally:
                dest.idle -= 1
        if self._stopping or not dest.jobs:
            return None
        return dest.jobs.popleft()

    async def _worker(self, dest: _Destination) -> None:
        """One connection's life: take jobs for its destination until idle or limit."""
        conn: Connection | None = None
        try:
            async with self._slots:
                for _ in range(MAX_TRANSACTIONS_PER_CONNECTION):
                    job = await self._next_job(dest)
                    if job is None:
                        break
                    if conn is None or not conn.is_usable:
                        conn = await self._connect(dest, job)
                        if conn is None:
                            continue  # the job (and the backlog) got their results
                    transfer = await self._transfer(job)
                    if transfer is None:
                        self._job_vanished(job)
                        continue
                    results = await self._send(conn, job, transfer)
                    if conn.was_stale:
                        # A pooled connection the server had dropped (it restarted, or a
                        # firewall forgot us): not a delivery failure. One fresh try.
                        log.info("qid=%s reconnecting to %s: pooled connection was closed",
                                 job.qid, conn.host)  # fmt: skip
                        await conn.close()
                        conn = await self._connect(dest, job)
                        if conn is None:
                            continue  # the job (and the backlog) got their results
                        results = await self._send(conn, job, transfer)
                    await self._record(job, results)
        finally:
            dest.workers -= 1
            if conn is not None:
                await conn.close()
            if dest.jobs and dest.workers == 0 and not self._stopping:
                dest.workers += 1
                self._spawn(self._worker(dest))
            elif not dest.jobs and dest.workers == 0:
                self._destinations.pop(dest.key, None)

    async def _send(self, conn: Connection, job: _Job, transfer: Transfer) -> list[RecipientResult]:
        started = time.monotonic()
        status = "deferred"
        try:
            results = await conn.deliver(transfer)
            status = results[0].status if results else status
            return results
        except Exception:
            # A bug, not the network (attempt.py turns those into results):
            # temporary is the default (STYLE.md §6), the details go to the log.
            log.exception("qid=%s unexpected error sending to %s", job.qid, conn.host)
            conn.abort()
            return [
                RecipientResult(r.address, "deferred", replies.INTERNAL_ERROR,
                                "internal error", conn.host)
                for r in job.recipients
            ]  # fmt: skip
        finally:
            metrics.ATTEMPT_SECONDS.labels(status).observe(time.monotonic() - started)

    async def _transfer(self, job: _Job) -> Transfer | None:
        env = self._envelopes.get(job.qid)
        if env is None:
            return None
        cached = self._messages.get(job.qid)
        if cached is not None:
            return Transfer(job.qid, env, job.recipients, cached, _clean_from(env, cached))
        message: bytes | StoredMessage
        try:
            if env.size <= CACHED_MESSAGE:
                message = await asyncio.to_thread(self.store.read_message, job.qid)
            else:
                # Streamed from the spool to the server (issue #18): one pass here for what
                # MAIL FROM must say (8-bit, SMTPUTF8), then the text a chunk at a time.
                message = await asyncio.to_thread(self._stored, job.qid)
        except SpoolError as e:  # NotFound included: deleted by the operator
            log.info("qid=%s message unavailable: %s", job.qid, e)
            return None
        head = message if isinstance(message, bytes) else message.head
        return Transfer(job.qid, env, job.recipients, message, _clean_from(env, head))

    def _stored(self, qid: str) -> StoredMessage:
        """A large message as attempt.py streams it; reads it once, a chunk at a time."""
        size, is_ascii = 0, True
        head = b""
        for chunk in self.store.read_chunks(qid):
            if not head:
                head = header_section(chunk)  # the section within the first chunk (256 KiB)
            size += len(chunk)
            is_ascii = is_ascii and chunk.isascii()
        return StoredMessage(size, head, is_ascii, partial(self.store.read_chunks, qid))

    def _job_vanished(self, job: _Job) -> None:
        self._release(job.qid)

    async def _connect(self, dest: _Destination, job: _Job) -> Connection | None:
        """A connection to the first host of the route that works. When the destination has
        no route or no host answers, this job and every job queued behind it get the same
        outcome (the destination is down: no point in trying it once per message)."""
        key = dest.key
        try:
            route: Route = await self.router.resolve(key.domain)
        except RouteError as e:
            await self._fail_backlog(dest, job, e.reply, e.detail, None)
            return None
        plan = await self.tlspolicy.plan(
            key.domain, route, requiretls=key.requiretls, tls_optional=key.tls_optional
        )
        for note in plan.notes:
            log.warning("qid=%s %s", job.qid, note)
        failure: ConnectFailure | None = None
        for refusal in plan.refusals:
            log.warning("qid=%s tls policy refuses %s: %s", job.qid,
                        refusal.host or key.domain, refusal.reply.text)  # fmt: skip
            self._count_session(key.domain, refusal.report, refusal.host, refusal.reply.text)
            if refusal.host is not None and failure is None:
                failure = ConnectFailure(refusal.host, refusal.reply.text, refusal.reply,
                                         policy=refusal.policy)  # fmt: skip
        for host, requirement in plan.hosts:
            try:
                conn = await Connection.open(
                    host,
                    helo=self.cfg.hostname,
                    tls_context=self._tls,
                    connect_timeout=self.dcfg.connect_timeout,
                    command_timeout=self.dcfg.command_timeout,
                    requirement=requirement,
                    judge=self.tlspolicy.judge,
                )
            except ConnectFailure as e:
                log.info("connect to %s failed: %s", host, e.detail)
                if e.policy != "none" and e.reply is not None:
                    # A next hop without REQUIRETLS had a good TLS session (RFC 8460 counts
                    # TLS, not what the message asked for).
                    why = "" if e.reply is REQUIRETLS_UNSUPPORTED else e.reply.text
                    self._count_session(key.domain, requirement.report, host, why,
                                        e.local_address)  # fmt: skip
                # A host refused by TLS policy says more than a later host that was down.
                if failure is None or e.policy != "none" or failure.policy == "none":
                    failure = e
                continue
            if conn.tls_failure:
                log.info("%s; delivering without TLS", conn.tls_failure)
            if conn.tls_note:
                log.warning("qid=%s %s (peer certificate: %s); delivering anyway",
                            job.qid, conn.tls_note, conn.peer)  # fmt: skip
            self._count_session(key.domain, requirement.report, host, conn.tls_note,
                                conn.local_address)  # fmt: skip
            return conn
        assert failure is not None  # a Route always has at least one host
        await self._fail_backlog(dest, job, failure.reply, failure.detail, failure)
        return None

    def _count_session(
        self,
        domain: str,
        report: tuple[str, tuple[str, ...]] | None,
        host: Host | None,
        failure: str,
        local_address: str = "",
    ) -> None:
        """One session (or refused host) for TLS-RPT, when a published policy applied."""
        if report is None or host is None:
            return
        result = result_type(failure) if failure else ""
        session = Session(domain, report[0], report[1], host.name, host.address, result,
                          failure[:200], local_address)  # fmt: skip
        self.tlsrpt.record(session, self.now())

    async def _tls_reports(self, clock: float) -> None:
        """Save today's TLS-RPT counters now and then; once a day, queue the reports of the
        days that ended (RFC 8460 §4.1: one report per policy domain and day)."""
        try:
            if clock - self._tlsrpt_saved_at >= tlsrpt.SAVE_INTERVAL:
                self._tlsrpt_saved_at = clock
                await asyncio.to_thread(self.tlsrpt.save)
            today = self.now().astimezone(UTC).date()
            if self._reported_on == today:
                return
            self._reported_on = today
            for day in await asyncio.to_thread(self.tlsrpt.finished_days, today):
                for domain, addresses, message in await self.tlsrpt.reports(day, self.now()):
                    envelope = Envelope(
                        id=new_queue_id(),
                        mail_from=self.postmaster,
                        recipients=tuple(Recipient(a) for a in addresses),
                        received_at=self.now(),
                        service="tlsrpt",
                        size=len(message),
                    )
                    stored = await asyncio.to_thread(self.store.enqueue, envelope, message)
                    log.info("qid=%s tlsrpt report domain=%s day=%s to=%s", stored.id, domain,
                             day.isoformat(), ",".join(addresses))  # fmt: skip
                    self._envelopes[stored.id] = stored
                    self._schedule(stored.id)
                await asyncio.to_thread(self.tlsrpt.forget, day)
        except (OSError, SpoolError) as e:
            log.error("tlsrpt: cannot save or send reports: %s", e)

    async def _fail_backlog(
        self,
        dest: _Destination,
        job: _Job,
        reply: replies.Reply | None,
        detail: str,
        failure: ConnectFailure | None,
    ) -> None:
        # A 5xx greeting from the last host is a refusal to take mail: permanent. Everything
        # else here (refused, timeout, TLS, DNS SERVFAIL) is temporary, unless the route
        # itself is permanently impossible (NXDOMAIN, null MX).
        status: Status = "deferred"
        if reply is not None and status_of_reply(reply) == "failed":
            status = "failed"
        jobs = [job, *dest.jobs]
        dest.jobs.clear()
        for each in jobs:
            results = [
                _failure_result(r.address, status, reply, detail, failure) for r in each.recipients
            ]
            await self._record(each, results)

    # --- recording outcomes ----------------------------------------------------------------

    def _release(self, qid: str) -> None:
        """One job of the entry is over; an idle entry goes back on the schedule."""
        left = self._active.get(qid, 0) - 1
        if left > 0:
            self._active[qid] = left
            return
        self._active.pop(qid, None)
        self._messages.pop(qid, None)
        if len(self._active) == MAX_ACTIVE_ENTRIES - 1:
            self._event.set()  # the dispatcher was held back by the cap
        env = self._envelopes.get(qid)
        if env is None:
            self._forget(qid)
        elif env.is_done:
            self._spawn(self._finish_entry(qid))
        else:
            self._schedule(qid)

    async def _record(self, job: _Job, results: Sequence[RecipientResult]) -> None:
        """Write the outcome of one try to the spool, log it, send notices that are due."""
        qid = job.qid
        now = self.now()
        lock = self._locks.get(qid)
        if lock is None:
            lock = self._locks[qid] = asyncio.Lock()
        warn: list[Envelope] = []
        try:
            async with lock:
                env = self._envelopes.get(qid)
                if env is None:
                    return
                # Fast path: the last open job of an entry delivered everything and nobody
                # asked for a success notice. Removing the entry is the record (one write).
                if (
                    self._active.get(qid) == 1
                    and _all_delivered(env, results)
                    and not self._success_notices(env, results)
                ):
                    with contextlib.suppress(NotFound):
                        await self._spool.remove(qid)
                    self._log(env, results, now, all_delivered=True)
                    tracelog.removed(qid)
                    self._forget(qid)
                    return
                try:
                    new = await self._spool.update(
                        qid, lambda e: self._merge(e, results, now, warn=warn)
                    )
                except NotFound:
                    log.info("qid=%s deleted during delivery", qid)
                    self._forget(qid)
                    return
                except SpoolError as e:
                    log.error("qid=%s cannot record delivery results: %s", qid, e)
                    return
                self._envelopes[qid] = new
                self._log(new, results, now)
                notices = self._success_notices(new, results)
                if notices:
                    await self._send_notice(new, notices, now)
                if warn:
                    await self._send_delay_warning(new, now)
        finally:
            self._release(qid)

    def _merge(
        self,
        env: Envelope,
        results: Sequence[RecipientResult],
        now: datetime,
        *,
        warn: list[Envelope],
    ) -> Envelope:
        """`env` (as stored now) with the results of one try applied; pure but for `warn`,
        which receives the envelope when this change is the one that sends the delay warning
        (decided under the spool lock, so it is sent at most once)."""
        by_address = {r.address: r for r in results}
        lifetime = timedelta(seconds=self.dcfg.max_queue_lifetime)
        recipients: list[Recipient] = []
        for rcpt in env.recipients:
            res = by_address.get(rcpt.address)
            if res is None or rcpt.state != "pending":
                recipients.append(rcpt)
                continue
            attempts = rcpt.attempts + 1
            line = res.reply_line
            attempt = Attempt(now, res.status, str(res.host) if res.host else "", line, res.tls)
            history = (*rcpt.history, attempt)[-MAX_HISTORY:]
            if res.status == "deferred":
                when = schedule.next_attempt_at(
                    env.received_at,
                    attempts,
                    self.rng,
                    now=now,
                    schedule=self.dcfg.retry_schedule,
                    max_lifetime=lifetime,
                )
                if when is None:
                    rcpt = replace(rcpt, state="failed", next_attempt_at=None)
                else:
                    rcpt = replace(rcpt, next_attempt_at=when)
            else:
                rcpt = replace(rcpt, state=res.status, next_attempt_at=None)
            recipients.append(replace(rcpt, attempts=attempts, last_reply=line, history=history))
        new = replace(env, recipients=tuple(recipients))
        if (
            new.mail_from
            and not new.is_bounce
            and any(_wants(r, "DELAY") for r in new.pending)
            and schedule.is_delay_warning_due(
                new.received_at,
                new.warned_at,
                now=now,
                delay_warning_after=timedelta(seconds=self.dcfg.delay_warning_after),
            )
        ):
            new = replace(new, warned_at=now)
            warn.append(new)
        return new

    def _log(
        self,
        env: Envelope,
        results: Sequence[RecipientResult],
        now: datetime,
        *,
        all_delivered: bool = False,
    ) -> None:
        """The outcome of each recipient of one try (`env` with the results applied; or, with
        all_delivered, `env` before, when the results delivered every recipient)."""
        states = {} if all_delivered else {r.address: r.state for r in env.recipients}
        delay = (now - env.received_at).total_seconds()
        for res in results:
            state = "delivered" if all_delivered else states.get(res.address, "pending")
            status = {"delivered": "sent", "failed": "bounced"}.get(state, "deferred")
            reply = res.reply_line
            if state == "failed" and res.status == "deferred":
                reply += " (delivery time expired)"
            # The peer certificate's names go with every failure, and with a session that
            # was not verified; a verified one is named by relay= already.
            extra = ""
            if res.tls and res.peer and (status != "sent" or not res.verified):
                extra += f' peer_cert="{_quote(res.peer)}"'
            if res.note:
                extra += f' tls_note="{_quote(res.note)}"'
            _count(env.id, status, res.address, res.host, reply, res.tls, res.verified, delay)
            log.info(
                "qid=%s to=<%s> relay=%s tls=%s verified=%s policy=%s%s delay=%.1f status=%s "
                'reply="%s"%s',
                env.id,
                res.address,
                res.host if res.host is not None else "none",
                "yes" if res.tls else "no",
                "yes" if res.verified else "no",
                res.policy,
                " requiretls=yes" if env.requiretls else "",
                delay,
                status,
                _quote(reply),
                extra,
            )

    # --- notices ---------------------------------------------------------------------------

    def _success_notices(
        self, env: Envelope, results: Sequence[RecipientResult]
    ) -> list[bounce.Notice]:
        """RFC 3461 §6.2 NOTIFY=SUCCESS: answered here ("relayed") unless the next hop offered
        DSN and took the request over."""
        if not env.mail_from or env.is_bounce:
            return []
        by_address = {r.address: r for r in env.recipients}
        notices: list[bounce.Notice] = []
        for res in results:
            rcpt = by_address.get(res.address)
            if (
                rcpt is not None
                and res.status == "delivered"
                and rcpt.notify is not None
                and "SUCCESS" in rcpt.notify
                and not res.dsn_passed
            ):
                notices.append(_notice(rcpt, "relayed", res.reply_line, res))
        return notices

    async def _send_notice(
        self, env: Envelope, notices: list[bounce.Notice], now: datetime
    ) -> None:
        message = self._messages.get(env.id)
        if message is None:
            message = await asyncio.to_thread(self._original, env)
        await self._queue_dsn(env, message, notices, now, to=env.mail_from)

    def _original(self, env: Envelope) -> bytes:
        """What a DSN needs of the message: all of it, or only its header section when it is
        too large to be returned (bounce.MAX_RETURNED_SIZE), so that a 50 MB message is not
        read whole to quote its headers."""
        if env.size > bounce.MAX_RETURNED_SIZE:
            return self.store.read_headers(env.id) + b"\r\n"  # and the empty line after it
        return self.store.read_message(env.id)

    async def _send_delay_warning(self, env: Envelope, now: datetime) -> None:
        until = schedule.expires_at(
            env.received_at, timedelta(seconds=self.dcfg.max_queue_lifetime)
        )
        notices = [
            replace(_notice(r, "delayed", r.last_reply, None), will_retry_until=until)
            for r in env.pending
            if _wants(r, "DELAY")
        ]
        if notices:
            await self._send_notice(env, notices, now)

    async def _finish_entry(self, qid: str) -> None:
        """Every recipient is final: report failures, then remove the entry."""
        if self._active.get(qid):
            return
        self._active[qid] = 1
        try:
            env = self._envelopes.get(qid)
            if env is None:
                return
            failed = [r for r in env.recipients if r.state == "failed" and _wants(r, "FAILURE")]
            if failed:
                notices = [_notice(r, "failed", r.last_reply, None) for r in failed]
                try:
                    message = await asyncio.to_thread(self._original, env)
                except NotFound:
                    message = b""
                now = self.now()
                if env.mail_from and not env.is_bounce:
                    await self._queue_dsn(env, message, notices, now, to=env.mail_from)
                elif not env.is_double_bounce:
                    # RFC 5321 §4.5.5 / §6.1: never bounce a null-sender message to its
                    # sender; the postmaster hears about it once ("double bounce").
                    await self._queue_dsn(env, message, notices, now, to=self.postmaster,
                                          double=True)  # fmt: skip
                else:
                    log.warning("qid=%s double bounce undeliverable, discarded", qid)
            with contextlib.suppress(NotFound):
                await self._spool.remove(qid)
            log.info("qid=%s removed", qid)
            tracelog.removed(qid)
        except SpoolError as e:
            log.error("qid=%s cannot finish entry: %s", qid, e)
        finally:
            self._active.pop(qid, None)
            self._forget(qid)

    async def _queue_dsn(
        self,
        original: Envelope,
        message: bytes,
        notices: list[bounce.Notice],
        now: datetime,
        *,
        to: str,
        double: bool = False,
    ) -> None:
        if original.requiretls:
            # RFC 8689 §5: the notice goes with REQUIRETLS too, and without the text that
            # its sender wanted protected.
            original = replace(original, ret="HDRS")
        dsn = bounce.build(
            original=original,
            message=message,
            size=original.size if original.size > bounce.MAX_RETURNED_SIZE else None,
            notices=notices,
            reporting_mta=self.cfg.hostname,
            now=now,
            recipient=to,
        )
        envelope = Envelope(
            id=new_queue_id(),
            mail_from="",  # RFC 5321 §4.5.5: DSNs are sent with the null reverse path
            recipients=(Recipient(to),),
            received_at=now,
            service="bounce",
            smtputf8=original.smtputf8,
            body="" if dsn.isascii() else "8BITMIME",
            is_bounce=True,
            is_double_bounce=double,
            size=len(dsn),
            requiretls=original.requiretls,
        )
        stored = await asyncio.to_thread(self.store.enqueue, envelope, dsn)
        kinds = ",".join(sorted({n.action for n in notices}))
        log.info("qid=%s dsn=%s sent as qid=%s to=<%s>", original.id, kinds, stored.id, to)
        metrics.DSNS.labels(kinds).inc()
        tracelog.dsn(original.id, action=kinds, dsn_qid=stored.id, to=to)
        tracelog.queued(stored.id, mail_from="", rcpts=[to], service="bounce", about=original.id)
        self._envelopes[stored.id] = stored
        self._schedule(stored.id)
        self._event.set()


_OUTCOMES = {"sent": "delivered", "bounced": "bounced", "deferred": "deferred"}


def _count(qid: str, status: str, rcpt: str, host: object, reply: str, tls: bool,
           verified: bool, delay: float) -> None:  # fmt: skip
    """Metrics and the trace event of one recipient's try (status as in the log line)."""
    outcome = _OUTCOMES[status]
    metrics.DELIVERIES.labels(outcome).inc()
    if outcome != "deferred":
        metrics.DELIVERY_DELAY.labels(outcome).observe(delay)
    if outcome == "delivered":
        metrics.DELIVERY_TLS.labels("yes" if tls else "no", "yes" if verified else "no").inc()
    tracelog.outcome(qid, status=outcome, rcpt=rcpt, relay=str(host) if host else "none",
                     reply=reply, tls=tls, delay=delay)  # fmt: skip


def _wants(rcpt: Recipient, kind: str) -> bool:
    """RFC 3461 §4.1: without NOTIFY, FAILURE and DELAY are reported (SUCCESS is not)."""
    if rcpt.notify is None:
        return kind in ("FAILURE", "DELAY")
    return kind in rcpt.notify


def _notice(
    rcpt: Recipient, action: bounce.Action, line: str, res: RecipientResult | None
) -> bounce.Notice:
    last = rcpt.history[-1] if rcpt.history else None
    host = res.host.name if res is not None and res.host is not None else ""
    if not host and last is not None and last.host:
        host = last.host.split("[", 1)[0]
    is_remote = bool(host) and line[:3].isdigit() and not is_own_diagnostic(line)
    policy_status = expired_status(line) if action == "failed" else None
    if policy_status is not None:
        # A TLS policy that could not be met for the whole lifetime: 5.7.x naming the policy
        # (the diagnostic is ours, not the remote host's).
        status = policy_status
    elif action == "failed" and line[:1] == "4":
        status = bounce.status_of(line, permanent=False)
        if status == "4.0.0":
            status = EXPIRED_STATUS
    elif action in ("failed", "delayed") and not line[:3].isdigit():
        status = EXPIRED_STATUS if action == "failed" else "4.4.1"
    else:
        status = bounce.status_of(line, permanent=action == "failed")
    return bounce.Notice(
        address=rcpt.address,
        action=action,
        status=status,
        diagnostic=line,
        remote_mta=host if is_remote else "",
        orcpt=rcpt.orcpt,
        last_attempt_at=last.at if last is not None else None,
    )


def _failure_result(
    address: str,
    status: Status,
    reply: replies.Reply | None,
    detail: str,
    failure: ConnectFailure | None,
) -> RecipientResult:
    """The result for a recipient whose destination could not be used."""
    if failure is None:
        return RecipientResult(address, status, reply, detail)
    return RecipientResult(
        address, status, reply, detail, failure.host, failure.tls,
        verified=failure.verified, policy=failure.policy, peer=failure.peer,
    )  # fmt: skip


def _clean_from(env: Envelope, head: bytes) -> int | None:
    """Where the message's body begins when it came over SMTP (from there on it has CR and LF
    only as CRLF: see _RECEIVED_OVER_SMTP); `head` is its start. None for the messages we made
    (bounces, reports) and any other: the encoder normalises all of those. The header section
    is always normalised: we wrote part of it."""
    if env.service not in _RECEIVED_OVER_SMTP:
        return None
    return len(header_section(head)) + 2  # and the empty line


def _quote(text: str) -> str:
    """A value inside "..." on a log line."""
    return text.replace('"', "'")


def _all_delivered(env: Envelope, results: Sequence[RecipientResult]) -> bool:
    """Whether `env` with `results` applied (as _merge applies them) has every recipient
    delivered, without building that envelope."""
    status = {r.address: r.status for r in results}  # the last one counts, as in _merge
    return all(
        r.state == "delivered" or (r.state == "pending" and status.get(r.address) == "delivered")
        for r in env.recipients
    )


def _tls_required_no(head: bytes) -> bool:
    """RFC 8689 §5: the message has a `TLS-Required: No` header field."""
    end = head.find(b"\r\n\r\n")
    block = head if end < 0 else head[: end + 2]
    if b"tls-required" not in block.lower():
        return False  # nearly every message: one pass in C instead of a loop over the lines
    for line in block.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"tls-required":
            return value.strip().lower() == b"no"
    return False


def _received_count(message: bytes) -> int:
    """The number of Received: header fields (RFC 5321 §6.3 loop detection)."""
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[: end + 2]
    count = 1 if head[:9].lower() == b"received:" else 0
    return count + head.lower().count(b"\nreceived:")


def _client_tls_context() -> ssl.SSLContext:
    """Opportunistic STARTTLS (RFC 3207, RFC 7435): encrypt, do not authenticate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx

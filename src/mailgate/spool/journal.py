"""The spool: every commit, update and removal is a record appended to a log (the journal).

Owns: spool/journal/ (segments; their format is record.py's), spool/journal.lock, the
in-memory index (segments.py) and tailing what other processes append, committing, reading
and changing entries, spool/tmp/ (`Incoming`), spool/wakeup. Compaction is compaction.py's,
recovery recovery.py's, importing the older one-file-per-entry layout files_import.py's; they
work on this store through the methods in its "for compaction and recovery" section. Must not:
parse or change message bytes, decide delivery, or talk to the network.

Why (issue #7): the disk that manages ~800 durable file creations per second appends ~30,000
records per second to one file with one fdatasync per group. A batch of commits is one
write() and one fdatasync(), and no file is created per message.

Layout:
  spool/journal/<seq>.log  segments, only ever appended to; the writer starts seq+1 once the
                           head passes `segment_size` (64 MiB)
  spool/journal.lock       flock: exclusive to append or compact, shared to read new records
  spool/tmp/               messages being received (spilled DATA); emptied at startup
  spool/corrupt/           entries whose envelope does not parse, copies of damaged segments
  spool/wakeup             touched by hold/release/delete/flush; a running engine polls its mtime

Durability contract (RFC 5321 §6.1: once "250" is sent, the message must not be lost): "250"
is given only after the message bytes and its envelope are durable. commit_batch() appends the
COMMIT records of the whole batch, fdatasyncs the segment (and fsyncs spool/journal/ when it
created the segment) and only then returns. kill -9 at any instant loses no acknowledged
message nor its per-recipient progress (update() is fdatasynced before it returns) and never
makes a half-written message deliverable: a record counts only when it is whole and its CRC
matches. A torn record at the tail (an interrupted append, never acknowledged) is cut away by
the next writer or by recover(); a bad record followed by good ones is skipped, and recover()
copies its segment to corrupt/ and logs it. ENOSPC, EDQUOT and EFBIG raise SpoolFull (452
4.3.1), other OS errors SpoolError; a failed write or fdatasync truncates the segment back, so
a failed commit leaves nothing.
A removal (the engine's record of a delivered message) is written under the lock but not
fdatasynced: a killed process loses nothing (the bytes are in the kernel), and the next
fdatasync of the segment, which the next commit makes anyway, makes it durable. Only a power cut
in between can bring the entry back, and then the message is delivered twice rather than lost,
as RFC 5321 §6.1 prefers; Postfix likewise unlinks a delivered queue file without syncing its
directory. The lock is then held for a write, not for a disk flush, so commits (whose 250
waits for them) do not queue behind the engine's removals. Commits also answer SpoolFull
when they would leave less than RESERVE (8 MiB, at most 1% of the file system) free: in a log
even a removal appends, so the engine must always have room to record its progress and remove
delivered entries, which is what lets compaction give space back.

Several processes (the server and `mailgate queue`): an append holds the exclusive flock from
its first write through its fdatasync, so records never interleave and a failed append can be
cut away. Every instance keeps an index (qid -> segment, offset and length of the message
bytes, envelope) and tails what others appended: ids(), load(), update() and remove() first
compare the head segment's size (one fstat) with what was read, and read new records under the
shared flock (never half an append). update() is read-modify-append under the exclusive flock.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from mailgate.errors import SpoolError, SpoolFull, UsageError
from mailgate.spool import compaction, recovery
from mailgate.spool.api import (
    HEADER_LIMIT,
    READ_CHUNK,
    NotFound,
    RecoveryReport,
    checked_qid,
    header_section,
    parse_envelope,
)
from mailgate.spool.disk import (
    CHUNK,
    FILE_MODE,
    copy_range,
    fsync_dir,
    make_spool_dirs,
    pread_exact,
    spool_error,
    unlink_quietly,
    write_all,
    write_counted,
)
from mailgate.spool.entry import Envelope, utcnow
from mailgate.spool.ids import is_queue_id, new_queue_id
from mailgate.spool.incoming import Incoming
from mailgate.spool.record import (
    COMMIT,
    REMOVE,
    SEGMENT_HEADER,
    UPDATE,
    Tail,
    encode,
    message_offset,
    read_segment_header,
    scan,
    segment_header,
    segment_name,
    seq_of,
    torn_qid,
)
from mailgate.spool.segments import Entry, Findings, Index, Out, Segment

log = logging.getLogger(__name__)

SEGMENT_SIZE = 64 * 1024 * 1024  # a soft limit: a batch may end past it, the next one rotates
_MAX_SEGMENTS = 1_000_000  # bounds the loops that walk segments (seq is 16 digits)
_ID_ATTEMPTS = 100  # fresh ids to try when one is already taken (practically never)
# Commits leave this much of the file system free (at most 1% of it), for the engine's updates
# and removals: in a log, even a removal appends, and only removals let compaction free space.
RESERVE = 8 * 1024 * 1024


@dataclass(eq=False, slots=True)
class _Change:
    """An update (`change`) or a removal (`change` None) waiting for the lock."""

    qid: str
    change: Callable[[Envelope], Envelope] | None
    done: bool = False
    result: Envelope | None = None
    error: Exception | None = None


class JournalStore:
    """The spool as a log of records (a `SpoolStore`). Safe to use from several threads and
    several processes."""

    def __init__(self, path: Path, *, segment_size: int = SEGMENT_SIZE) -> None:
        self.path = Path(path)
        self.tmp_dir = self.path / "tmp"
        self.journal_dir = self.path / "journal"
        self.corrupt_dir = self.path / "corrupt"
        self.wakeup_path = self.path / "wakeup"
        self.lock_path = self.path / "journal.lock"
        self.segment_size = segment_size
        self.owner = make_spool_dirs(self.path, (self.tmp_dir, self.journal_dir, self.corrupt_dir))
        # Guards the index. Order: a flock first, then this, never the other way round (a
        # thread waiting in flock must not hold it).
        self.mutex = threading.RLock()
        self.index = Index()
        self._queue_lock = threading.Lock()
        self._changes: list[_Change] = []  # update()/remove() calls waiting for the flock
        try:
            with self.flock(fcntl.LOCK_SH), self.mutex:
                self.rebuild(repair=False, findings=None)
        except OSError as e:
            raise spool_error(e, f"reading spool journal {self.journal_dir}") from None

    def close(self) -> None:
        """Close the segment descriptors (the object is unusable afterwards)."""
        with self.mutex:
            self.index.clear()

    # -- receiving ------------------------------------------------------------------------

    def begin(self, qid: str | None = None) -> Incoming:
        """Start receiving a message; its queue id is known from here on (for Received)."""
        if qid is not None:
            if not is_queue_id(qid):
                raise UsageError(f"not a queue id: {qid!r}")
            if self._taken(qid):
                raise SpoolError(f"qid={qid}: queue id already in use")
            return Incoming(qid, self.tmp_dir, self.owner)
        for _ in range(_ID_ATTEMPTS):
            qid = new_queue_id()
            if not self._taken(qid):
                return Incoming(qid, self.tmp_dir, self.owner)
        raise SpoolError("could not allocate a fresh queue id")

    def _taken(self, qid: str) -> bool:
        # commit_batch() checks again under the lock, after tailing. No stat of spool/tmp/
        # per message: an in-flight message of another process with the same id (36**-5 per
        # pair in one millisecond) could only clash by spilling there, and Incoming creates
        # its spill file with O_EXCL, so that session gets a 451.
        with self.mutex:
            return qid in self.index.entries

    @staticmethod
    def prepare_commit(incoming: Incoming, envelope: Envelope) -> None:
        """Check a commit's arguments and claim the incoming message for it, in the caller's
        thread (spool/group.py does this before handing the batch to a worker thread).
        Raises UsageError for a foreign envelope id or an incoming already committed/aborted."""
        if envelope.id not in ("", incoming.qid):
            raise UsageError(f"envelope id {envelope.id!r} is not the queue id {incoming.qid!r}")
        incoming.claim()

    def commit(self, incoming: Incoming, envelope: Envelope, prefix: bytes = b"") -> Envelope:
        """Store the message (prefix + received bytes) and its envelope durably.

        `envelope.id` must be `incoming.qid` (or "" to have it filled in). Returns the envelope
        as stored, with `size` set. The incoming message is consumed whatever the outcome.
        """
        result = self.commit_batch([(incoming, envelope, prefix)])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def enqueue(self, envelope: Envelope, message: bytes) -> Envelope:
        """Spool a message we generated (a bounce). A non-empty `envelope.id` is used as the id."""
        incoming = self.begin(envelope.id or None)
        try:
            incoming.write(message)
        except BaseException:
            incoming.abort()
            raise
        return self.commit(incoming, envelope)

    def commit_batch(
        self, items: Sequence[tuple[Incoming, Envelope, bytes]]
    ) -> list[Envelope | Exception]:
        """Commit several entries with one write and one fdatasync.

        Returns one result per item, in order: the stored envelope or the exception for that
        entry. One entry's failure (its write hit a full disk) fails only that entry; a
        failed fdatasync is shared, so it fails every entry of the batch and leaves nothing.
        """
        results: list[Envelope | Exception] = [UsageError("not committed")] * len(items)
        claimed: list[tuple[int, Incoming, Envelope, bytes]] = []
        for index, (incoming, envelope, prefix) in enumerate(items):
            try:
                if not incoming.is_claimed:
                    self.prepare_commit(incoming, envelope)
                incoming.take()  # whatever happens next, it cannot be committed twice
            except UsageError as e:
                results[index] = e
                continue
            claimed.append((index, incoming, envelope, prefix))
        if not claimed:
            return results
        sources: list[int] = []
        try:
            with self.writing():
                self._commit_locked(claimed, results, sources)
        except OSError as e:
            error = spool_error(e, "commit")
            for index, *_ in claimed:
                if not isinstance(results[index], Envelope):
                    results[index] = error
        except SpoolError as e:
            for index, *_ in claimed:
                if not isinstance(results[index], Envelope):
                    results[index] = e
        finally:
            for fd in sources:
                os.close(fd)
            for _, incoming, _, _ in claimed:
                incoming.release()  # the spill file, the memory: free them now
        return results

    def _commit_locked(
        self,
        claimed: list[tuple[int, Incoming, Envelope, bytes]],
        results: list[Envelope | Exception],
        sources: list[int],
    ) -> None:
        seg = self.writable_head()
        assert seg.magic is not None
        outs: list[Out] = []
        staged: list[tuple[int, Envelope, bytes]] = []
        for index, incoming, envelope, prefix in claimed:
            qid = incoming.qid
            if incoming.failure is not None:
                results[index] = incoming.failure
                continue
            if qid in self.index.entries:
                results[index] = SpoolError(f"qid={qid}: queue id already in use")
                continue
            # The message: our prefix, the (maybe rewritten) head, the received bytes after
            # the cut; a spilled body is copied file to file by the kernel, never read here.
            head, cut = prefix + incoming.head, incoming.cut
            stored = replace(envelope, id=qid, size=len(head) + incoming.size - cut)
            try:
                raw = stored.to_json()
                memory = incoming.in_memory()
                if memory is not None:
                    body = memory[cut:] if cut else memory
                    out = Out(encode(seg.magic, COMMIT, qid, raw, (head, body)))
                else:
                    incoming.finish_spill()
                    src = os.open(incoming.spill_path, os.O_RDONLY | os.O_CLOEXEC)
                    sources.append(src)
                    length = incoming.size - cut
                    out = self.commit_from(seg, qid, raw, (head,), src, cut, length)
            except OSError as e:
                results[index] = spool_error(e, f"qid={qid} commit")
                continue
            except Exception as e:  # per entry: even a bug in one must not fail its neighbours
                results[index] = e
                continue
            outs.append(out)
            staged.append((index, stored, raw))
        if not outs:
            return
        if not self._room_for(sum(out.size for out in outs)):
            full = SpoolFull("commit: spool disk nearly full (the rest is kept for deliveries)")
            for index, _, _ in staged:
                results[index] = full
            return
        start = seg.end
        written = self.write_outs(seg, outs)
        done: list[tuple[int, Envelope, bytes, int, int]] = []
        for (index, stored, raw), out, where in zip(staged, outs, written, strict=True):
            if isinstance(where, OSError):
                results[index] = spool_error(where, f"qid={stored.id} commit")
            else:
                done.append((index, stored, raw, where, out.size))
        if not done:
            return
        try:
            self.sync(seg, start)
        except OSError as e:
            error = spool_error(e, "commit: fdatasync of the spool journal")
            log.error("spool commit failed for %d entries: %s", len(done), error)
            for index, *_ in done:
                results[index] = error
            return
        with self.mutex:
            for index, stored, raw, where, weight in done:
                qid = stored.id
                offset = message_offset(where, qid, raw)
                self.index.add(qid, seg, Entry(seg.seq, offset, stored.size, weight, raw, stored))
                results[index] = stored
                log.debug("qid=%s committed size=%d", qid, stored.size)

    # -- reading ------------------------------------------------------------------------

    def ids(self) -> list[str]:
        """Queue ids of committed entries, oldest first (ids sort by time of arrival)."""
        self._refresh()
        with self.mutex:
            return sorted(self.index.entries)

    def load(self, qid: str) -> Envelope:
        """The committed envelope; NotFound if there is none, SpoolError if it does not parse."""
        checked_qid(qid)
        self._refresh()
        with self.mutex:
            entry = self.index.entries.get(qid)
            if entry is None:
                raise NotFound(f"no such queue entry: {qid}")
            return self.envelope_of(qid, entry)

    def envelope_of(self, qid: str, entry: Entry) -> Envelope:
        """The parsed envelope of an indexed entry (parsed once, then kept)."""
        if entry.envelope is None:
            entry.envelope = parse_envelope(qid, entry.raw)
        return entry.envelope

    def read_message(self, qid: str) -> bytes:
        return self._read(qid, None)

    def read_headers(self, qid: str, limit: int = HEADER_LIMIT) -> bytes:
        """The message's header section (up to and excluding the empty line), at most `limit`
        bytes, without reading a large body."""
        return header_section(self._read(qid, limit))

    def read_chunks(self, qid: str, size: int = READ_CHUNK) -> Iterator[bytes]:
        """The message bytes in chunks of `size`, from a descriptor of our own (a compaction
        meanwhile cannot close it; an unlinked segment stays readable through it)."""
        checked_qid(qid)
        fd = -1
        for attempt in range(2):
            with self.mutex:
                entry = self.index.entries.get(qid)
                if entry is not None:
                    seg = self.index.segments[entry.segment]
                    assert seg.fd is not None  # open while a current entry lives there
                    try:
                        fd = os.dup(seg.fd)
                    except OSError as e:
                        raise spool_error(e, f"qid={qid} reading message") from None
                    offset, length = entry.offset, entry.length
                    break
            if attempt == 0:
                self._refresh()
        if fd < 0:
            raise NotFound(f"no such queue entry: {qid}")
        try:
            for start in range(0, length, size):
                yield pread_exact(fd, min(size, length - start), offset + start)
        except OSError as e:
            raise spool_error(e, f"qid={qid} reading message") from None
        finally:
            os.close(fd)

    def _read(self, qid: str, limit: int | None) -> bytes:
        # No refresh first: the engine calls this on its event loop for entries it knows,
        # and must not wait there for another process's fdatasync. Unknown: refresh, retry.
        checked_qid(qid)
        for attempt in range(2):
            fd = -1
            with self.mutex:
                entry = self.index.entries.get(qid)
                if entry is not None:
                    seg = self.index.segments[entry.segment]
                    assert seg.fd is not None  # open while a current entry lives there
                    length = entry.length if limit is None else min(limit, entry.length)
                    try:
                        if length <= CHUNK:
                            return pread_exact(seg.fd, length, entry.offset)
                        # Large: read outside the mutex, from a descriptor of our own that
                        # a compaction meanwhile cannot close.
                        fd, offset = os.dup(seg.fd), entry.offset
                    except OSError as e:
                        raise spool_error(e, f"qid={qid} reading message") from None
            if fd >= 0:
                try:
                    return pread_exact(fd, length, offset)
                except OSError as e:
                    raise spool_error(e, f"qid={qid} reading message") from None
                finally:
                    os.close(fd)
            if attempt == 0:
                self._refresh()
        raise NotFound(f"no such queue entry: {qid}")

    # -- changing -----------------------------------------------------------------------

    def update(self, qid: str, change: Callable[[Envelope], Envelope]) -> Envelope:
        """Apply `change` to the stored envelope under the exclusive lock and append the result
        (fdatasynced before returning). Returns the new envelope.

        Concurrent update() and remove() calls of one instance share a write and an fdatasync:
        whichever thread gets the lock applies every change queued so far, in order. So
        `change` may run in another thread of this process; it must only compute."""
        checked_qid(qid)
        new = self._change(_Change(qid, change))
        assert new is not None
        return new

    def remove(self, qid: str) -> None:
        """Delete an entry: a REMOVE record, batched with concurrent updates and removals; it is
        fdatasynced with them when the batch has an update, else by the next commit's
        fdatasync (see the module docstring)."""
        checked_qid(qid)
        self._change(_Change(qid, None))
        log.debug("qid=%s removed", qid)

    def hold(self, qid: str) -> Envelope:
        """The engine skips held entries until `release()`."""
        envelope = self.update(qid, lambda e: replace(e, held=True))
        self.poke()
        return envelope

    def release(self, qid: str) -> Envelope:
        envelope = self.update(qid, lambda e: replace(e, held=False))
        self.poke()
        return envelope

    def delete(self, qid: str) -> None:
        """`remove()` plus a poke, for the operator (the engine forgets the entry)."""
        self.remove(qid)
        self.poke()

    def flush(self, qid: str | None = None) -> int:
        """Make pending recipients due now (one entry, or all when qid is None); poke the engine.

        Returns the number of entries changed. With qid None, entries that vanish meanwhile are
        skipped, and so are unreadable ones (logged).
        """
        now = utcnow()

        def due_now(envelope: Envelope) -> Envelope:
            recipients = tuple(
                replace(r, next_attempt_at=now) if r.state == "pending" else r
                for r in envelope.recipients
            )
            return replace(envelope, recipients=recipients)

        if qid is not None:
            self.update(qid, due_now)
            count = 1
        else:
            count = 0
            for each in self.ids():
                try:
                    self.update(each, due_now)
                except NotFound:
                    continue  # delivered and removed meanwhile
                except SpoolError as e:
                    log.warning("qid=%s flush skipped: %s", each, e)
                    continue
                count += 1
        self.poke()
        return count

    def change_batch(
        self, changes: Sequence[tuple[str, Callable[[Envelope], Envelope] | None]]
    ) -> list[Envelope | Exception | None]:
        """Several update()s (a change) and remove()s (None) at once, applied in order, with one
        write and, when an update is among them, one fdatasync before returning.

        Returns one result per item: the new envelope (an update), None (a removal), or that
        item's own error (NotFound, SpoolError, SpoolFull); one item's error does not stop the
        others unless the cause is shared (a failed write fails them all). Each `change` may
        run in another thread of this process and must only compute."""
        requests: list[_Change] = []
        results: list[Envelope | Exception | None] = []
        for qid, change in changes:
            try:
                checked_qid(qid)
            except NotFound as e:
                results.append(e)
                continue
            results.append(None)
            requests.append(_Change(qid, change))
        if requests:
            self._apply_queued(requests)
        out = iter(requests)
        for n, result in enumerate(results):
            if isinstance(result, Exception):
                continue
            request = next(out)
            results[n] = request.error if request.error is not None else request.result
        return results

    def _change(self, request: _Change) -> Envelope | None:
        self._apply_queued([request])
        if request.error is not None:
            raise request.error
        return request.result

    def _apply_queued(self, requests: list[_Change]) -> None:
        """Queue `requests` and see them applied: each ends done, or with its error set."""
        # Queue first, then wait for the lock: whoever holds it next applies everything
        # queued, so when we get it our requests are either done or still in the queue.
        with self._queue_lock:
            self._changes.extend(requests)
        try:
            with self.writing():
                if not all(request.done for request in requests):
                    with self._queue_lock:
                        batch, self._changes = self._changes, []
                    self._apply_changes(batch)
        except OSError as e:
            with self._queue_lock:
                mine = {id(request) for request in requests}
                self._changes = [r for r in self._changes if id(r) not in mine]
            for request in requests:
                if not request.done:
                    request.error = spool_error(e, f"qid={request.qid} changing entry")
                    request.done = True

    def _apply_changes(self, batch: list[_Change]) -> None:
        """Under the exclusive flock: one write and one fdatasync for a batch of changes.
        Every request ends done, with its result or its own error."""
        try:
            self._apply_changes_locked(batch)
        except OSError as e:
            for request in batch:
                if not request.done:
                    request.error = spool_error(e, f"qid={request.qid} changing entry")
        except BaseException as e:
            for request in batch:
                if not request.done:
                    request.error = SpoolError(f"qid={request.qid}: change failed: {e!r}")
            raise
        finally:
            for request in batch:
                request.done = True

    def _apply_changes_locked(self, batch: list[_Change]) -> None:
        head = self.writable_head()
        assert head.magic is not None
        current: dict[str, Envelope | None] = {}  # this batch's effect so far; None: removed
        outs: list[Out] = []
        planned: list[tuple[_Change, bytes]] = []
        for request in batch:
            qid = request.qid
            entry = self.index.entries.get(qid)
            try:
                if qid in current:
                    before = current[qid]
                elif entry is not None:
                    before = self.envelope_of(qid, entry)
                else:
                    before = None
                if before is None:
                    raise NotFound(f"no such queue entry: {qid}")
                if request.change is None:
                    current[qid] = None
                    outs.append(Out(encode(head.magic, REMOVE, qid)))
                    planned.append((request, b""))
                    continue
                new = request.change(before)
                if new.id != qid:
                    raise UsageError(f"qid={qid}: update changed the id to {new.id!r}")
                raw = new.to_json()
            except Exception as e:  # the caller's own error (NotFound, a bug in change)
                request.error = e
                request.done = True
                continue
            current[qid] = new
            request.result = new
            outs.append(Out(encode(head.magic, UPDATE, qid, raw)))
            planned.append((request, raw))
        if not outs:
            return
        start = head.end
        written = self.write_outs(head, outs)
        failed = next((w for w in written if isinstance(w, OSError)), None)
        if failed is not None:
            self.truncate(head, start)  # all or nothing: the changes may depend on each other
            raise failed
        if head.needs_dir_sync or any(request.change is not None for request, _ in planned):
            self.sync(head, start)
        with self.mutex:
            for request, raw in planned:
                entry = self.index.entries.get(request.qid)
                assert entry is not None
                if request.change is None:
                    self.index.drop(request.qid)
                else:
                    entry.raw, entry.envelope = raw, request.result
                request.done = True
        compaction.compact_quietly(self)

    # -- waking a running engine --------------------------------------------------------------

    def wakeup_mtime(self) -> float:
        """The mtime of spool/wakeup (0.0 if absent). A change means "rescan the spool"."""
        try:
            return os.stat(self.wakeup_path).st_mtime
        except FileNotFoundError:
            return 0.0
        except OSError as e:
            raise spool_error(e, "stat of spool wakeup file") from None

    def poke(self) -> None:
        """Touch spool/wakeup so that a running engine rescans."""
        try:
            fd = os.open(self.wakeup_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            try:
                if self.owner is not None:
                    os.fchown(fd, *self.owner)
                # Timestamps are coarse (a clock tick) and the engine compares floats: step at
                # least 1 µs past the old value, so two pokes in one tick still differ.
                old = os.fstat(fd).st_mtime_ns
                new = max(time.time_ns(), old + 1000)
                os.utime(fd, ns=(new, new))
            finally:
                os.close(fd)
        except OSError as e:
            raise spool_error(e, "touching spool wakeup file") from None

    # -- startup and maintenance ----------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Repair what an interrupted run left behind (call before serving): see recovery.py."""
        return recovery.recover(self)

    def compact(self) -> int:
        """Delete (after copying forward what still lives there) as many of the oldest
        segments as the policy allows; returns how many. The engine's removals do this as
        they go; this is for tests and operators."""
        try:
            with self.writing():
                return compaction.compact(self)
        except OSError as e:
            raise spool_error(e, "compacting the spool journal") from None

    # -- for compaction and recovery: the index, the lock, appending -----------------------

    @contextmanager
    def flock(self, mode: int) -> Iterator[None]:
        # A descriptor per acquisition: flock locks belong to the open file description, so
        # two threads sharing one would not exclude each other.
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(self.lock_path, flags, FILE_MODE)
        try:
            if self.owner is not None:
                os.fchown(fd, *self.owner)
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # also releases the lock

    @contextmanager
    def writing(self) -> Iterator[None]:
        """The exclusive flock, with the index brought up to date (and torn tails cut)."""
        with self.flock(fcntl.LOCK_EX):
            with self.mutex:
                self._tail(repair=True, findings=None)
            yield

    def rebuild(self, *, repair: bool, findings: Findings | None) -> None:
        """Forget everything and read the whole journal (under a flock and the mutex)."""
        self.index.clear()
        seqs = sorted(s for n in os.listdir(self.journal_dir) if (s := seq_of(n)) is not None)
        for n, seq in enumerate(seqs):
            opened = self._open_segment(seq)
            if opened is None:
                continue  # gone since listdir(): an operator's doing; nothing else deletes
            self._read_new(opened, repair=repair, last=n == len(seqs) - 1, findings=findings)
        self.index.close_idle()

    def writable_head(self) -> Segment:
        """The head segment, open for writing at its end; a new one when it is full."""
        head = self.index.head()
        # A head whose header never got written whole (a crash right after creating it)
        # holds no record: write the header again. One with bytes after a bad header is
        # damage: leave it for recover() (which copies it to corrupt/), start a new segment.
        if (
            head is not None
            and head.magic is None
            and head.fd is not None
            and os.fstat(head.fd).st_size <= SEGMENT_HEADER.size
        ):
            self._rewrite_header(head)
        if head is None or head.end >= self.segment_size or head.magic is None:
            if head is not None:
                head.close_writer()
            return self._create_segment(1 if head is None else head.seq + 1)
        if head.wfd is None:
            head.wfd = os.open(head.path, os.O_WRONLY | os.O_CLOEXEC)
        os.lseek(head.wfd, head.end, os.SEEK_SET)
        return head

    def commit_from(
        self,
        seg: Segment,
        qid: str,
        raw: bytes,
        message: Sequence[bytes | bytearray],
        source: int,
        offset: int,
        length: int,
    ) -> Out:
        """A COMMIT for `seg` whose message ends with `length` bytes of the file `source`
        from `offset` (copied in the kernel when appended)."""
        assert seg.magic is not None
        tail = Tail(partial(os.pread, source), offset, length)
        return Out(encode(seg.magic, COMMIT, qid, raw, message, tail), source, offset, length)

    def remove_record(self, seg: Segment, qid: str) -> Out:
        assert seg.magic is not None
        return Out(encode(seg.magic, REMOVE, qid))

    def write_outs(self, seg: Segment, outs: Sequence[Out]) -> list[int | OSError]:
        """Append records at seg.end: in-memory runs with one write each, streamed ones by
        copy. Returns each record's offset, or the error that failed it (its bytes are cut
        away again; the records before it stay). Not yet durable: see sync()."""
        assert seg.wfd is not None
        results: list[int | OSError] = [OSError(errno.EIO, "not written")] * len(outs)
        i = 0
        while i < len(outs):  # bounded: i grows every pass
            if outs[i].source is None:
                j = i
                while j < len(outs) and outs[j].source is None:
                    j += 1
                data = b"".join(p for out in outs[i:j] for p in out.parts)
                written, error = write_counted(seg.wfd, data)
                done = 0
                for k in range(i, j):
                    if done + outs[k].size > written:
                        break
                    results[k] = seg.end + done
                    done += outs[k].size
                    i = k + 1
                seg.end += done
                if error is None:
                    i = j
                    continue
                results[i] = error  # the first record not wholly written
                i += 1
            else:
                out = outs[i]
                assert out.source is not None
                try:
                    write_all(seg.wfd, b"".join(out.parts))
                    copy_range(out.source, seg.wfd, out.offset, out.length)
                except OSError as e:
                    results[i] = e
                else:
                    results[i] = seg.end
                    seg.end += out.size
                    i += 1
                    continue
                i += 1
            try:
                self.truncate(seg, seg.end)
            except OSError as e:
                # The failed bytes stay: fail the rest too; the next writer cuts them away
                # as a torn tail (or recover() skips them as damage).
                log.error("spool journal: %s: cannot cut a failed append: %s", seg.path.name, e)
                for k in range(i, len(outs)):
                    results[k] = e
                break
        seg.seen = seg.end
        return results

    def sync(self, seg: Segment, start: int) -> None:
        """Make seg's appends since `start` durable, or cut them away and raise OSError."""
        assert seg.wfd is not None
        try:
            os.fdatasync(seg.wfd)
            if seg.needs_dir_sync:
                fsync_dir(self.journal_dir)
                seg.needs_dir_sync = False
        except OSError:
            try:
                self.truncate(seg, start)
            except OSError as e:
                log.error("spool journal: %s: cannot cut an unsynced append: %s", seg.path, e)
            raise

    def truncate(self, seg: Segment, size: int, *, sync: bool = False) -> None:
        """Cut `seg` back to `size` (a failed or torn append). Raises OSError."""
        fd = seg.wfd if seg.wfd is not None else os.open(seg.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            if sync:
                os.fdatasync(fd)
            os.lseek(fd, size, os.SEEK_SET)
        finally:
            if fd != seg.wfd:
                os.close(fd)
        seg.end = seg.seen = size

    def append_one(self, out: Out) -> tuple[Segment, int]:
        """Append one record durably (under the exclusive flock); return where it is."""
        seg = self.writable_head()
        start = seg.end
        [result] = self.write_outs(seg, [out])
        if isinstance(result, OSError):
            raise result
        self.sync(seg, start)
        return seg, result

    # -- private: tailing --------------------------------------------------------------------

    def _news(self) -> bool:
        """Whether another process may have appended (cheap: an fstat and a stat)."""
        with self.mutex:  # the fstat too: a descriptor number must not be reused under it
            head = self.index.head()
            if head is None:  # an empty journal; the first writer starts segment 1
                return (self.journal_dir / segment_name(1)).exists()
            if head.fd is None or head.magic is None:
                return True
            st = os.fstat(head.fd)
            if st.st_size != head.seen or head.end != st.st_size or st.st_nlink == 0:
                return True
            return (self.journal_dir / segment_name(head.seq + 1)).exists()

    def _refresh(self) -> None:
        """Read what other processes appended since we last looked."""
        try:
            if self._news():
                with self.flock(fcntl.LOCK_SH), self.mutex:
                    self._tail(repair=False, findings=None)
        except OSError as e:
            raise spool_error(e, f"reading spool journal {self.journal_dir}") from None

    def _open_segment(self, seq: int) -> Segment | None:
        path = self.journal_dir / segment_name(seq)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        seg = self.index.segments[seq] = Segment(seq, path, fd)
        return seg

    def _tail(self, *, repair: bool, findings: Findings | None) -> None:
        """Apply new records of the head segment and of any segment after it."""
        for _ in range(_MAX_SEGMENTS):
            head = self.index.head()
            if head is None:
                if (self.journal_dir / segment_name(1)).exists():
                    self.rebuild(repair=repair, findings=findings)
                return
            nxt = self.journal_dir / segment_name(head.seq + 1)
            has_next = nxt.exists()  # before reading: then the head is complete when read
            if head.fd is None or os.fstat(head.fd).st_nlink == 0:
                # The head we knew was compacted away: we missed segments, start over.
                self.rebuild(repair=repair, findings=findings)
                return
            self._read_new(head, repair=repair, last=not has_next, findings=findings)
            if not has_next or self._open_segment(head.seq + 1) is None:
                if has_next:  # appeared and vanished: compaction ran, start over
                    self.rebuild(repair=repair, findings=findings)
                return
            if head.live == 0:
                head.close()
            head.close_writer()
        raise SpoolError("spool journal: too many segments")

    def _read_new(
        self, seg: Segment, *, repair: bool, last: bool, findings: Findings | None
    ) -> None:
        """Apply the records appended to `seg` since seg.end."""
        assert seg.fd is not None
        read = partial(os.pread, seg.fd)
        size = os.fstat(seg.fd).st_size
        if seg.magic is None:
            seg.magic = read_segment_header(read, seg.seq)
            if seg.magic is None:
                seg.seen = size
                # The last segment's header may be torn by a crash right after creating it
                # (no record was acknowledged in it yet); anything else is damage.
                if findings is not None and (not last or size > SEGMENT_HEADER.size):
                    findings.damaged.add(seg.seq)
                    log.error("spool journal: %s has no valid header", seg.path.name)
                return
            seg.end = SEGMENT_HEADER.size
        if size == seg.end:
            seg.seen = size
            return
        found = scan(read, seg.magic, seg.end, size)
        for record in found.records:
            self.index.apply(seg, record)
        for start, stop in found.bad:
            log.error("spool journal: %s: damaged bytes %d-%d skipped", seg.path.name, start, stop)
            if findings is not None:
                findings.damaged.add(seg.seq)
        seg.end = found.end
        seg.seen = size
        if found.torn_at is not None and repair:
            # An append that never finished (and so was never acknowledged): cut it away,
            # before anyone appends after it and turns it into damage in the middle.
            qid = torn_qid(read, seg.magic, found.torn_at)
            log.warning(
                "spool journal: %s: cut %d bytes of an unfinished append at %d%s",
                seg.path.name, size - found.torn_at, found.torn_at,
                f" qid={qid}" if qid else "",
            )  # fmt: skip
            if findings is not None and qid:
                findings.orphans.append(qid)
            self.truncate(seg, found.torn_at, sync=True)

    # -- private: writing ----------------------------------------------------------------

    def _create_segment(self, seq: int) -> Segment:
        path = self.journal_dir / segment_name(seq)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        wfd = os.open(path, flags, FILE_MODE)
        magic = secrets.token_bytes(8)
        try:
            if self.owner is not None:
                os.fchown(wfd, *self.owner)
            write_all(wfd, segment_header(seq, magic))
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            os.close(wfd)
            unlink_quietly(path)
            raise
        size = SEGMENT_HEADER.size
        seg = Segment(seq, path, fd, wfd, magic, size, size, needs_dir_sync=True)
        with self.mutex:
            self.index.segments[seq] = seg
        log.debug("spool journal: started %s", path.name)
        return seg

    def _rewrite_header(self, seg: Segment) -> None:
        seg.close_writer()
        wfd = os.open(seg.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            magic = secrets.token_bytes(8)
            os.ftruncate(wfd, 0)
            write_all(wfd, segment_header(seg.seq, magic))
        except BaseException:
            os.close(wfd)
            raise
        seg.wfd, seg.magic = wfd, magic
        seg.end = seg.seen = SEGMENT_HEADER.size
        seg.needs_dir_sync = True

    def _room_for(self, size: int) -> bool:
        """Whether `size` more bytes leave the reserve free (see RESERVE)."""
        st = os.statvfs(self.journal_dir)
        reserve = min(RESERVE, st.f_blocks * st.f_frsize // 100)
        return st.f_bavail * st.f_frsize - size >= reserve

"""The journal spool backend: every commit, update and removal is a record appended to a log.

Owns: spool/journal/ (segments, the record format, the in-memory index, tailing what other
processes append, compaction, crash recovery) and spool/journal.lock. Shares with the files
backend (store.py) spool/tmp/ (`Incoming`), spool/corrupt/, spool/wakeup and the whole `Store`
API, so that the engine, `mailgate queue`, GroupCommitter and accept work unchanged. Must not:
parse or change message bytes, decide delivery, or talk to the network.

Why (issue #7): the disk that manages ~800 durable file creations per second appends ~30,000
records per second to one file with one fdatasync per group. Here a batch of commits is one
write() and one fdatasync(), and no file is created per message.

Layout:
  spool/journal/<seq>.log  segments (seq: 16 decimal digits), only ever appended to; the writer
                           starts seq+1 once the head passes `segment_size` (64 MiB)
  spool/journal.lock       flock: exclusive to append or compact, shared to read new records
  spool/tmp/ corrupt/ wakeup   as in store.py; corrupt/ also gets copies of damaged segments

A segment starts with a 36-byte header (b"MAILGATE-JRNL-1\\n", seq, an 8-byte random record
magic, CRC-32), then records:
  [magic 8][type 1][qid length 1][zero 2][payload length 8][CRC-32 4][qid][payload]
  COMMIT  payload [envelope length 4][envelope JSON][message bytes]
  UPDATE  payload  the whole envelope JSON
  REMOVE  payload  empty
The CRC covers the header fields, the qid and the payload. The magic is random per segment, so
a message that quotes a record (a crafted body) can never be taken for one. The last record of
a qid wins: a newer COMMIT (compaction's copy) supersedes older records; REMOVE ends the entry.

Durability contract (RFC 5321 §6.1: once "250" is sent, the message must not be lost): "250"
is given only after the message bytes and its envelope are durable. commit_batch() appends the
COMMIT records of the whole batch, fdatasyncs the segment (and fsyncs spool/journal/ when it
created the segment) and only then returns. kill -9 at any instant loses no acknowledged
message nor its per-recipient progress (update() is fdatasynced before it returns) and never
makes a half-written message deliverable: a record counts only when it is
whole and its CRC matches. A torn record at the tail (an interrupted append, never
acknowledged) is cut away by the next writer or by recover(); a bad record followed by good
ones is skipped, and recover() copies its segment to corrupt/ and logs it. ENOSPC, EDQUOT and
EFBIG raise SpoolFull (452 4.3.1), other OS errors SpoolError; a failed write or fdatasync
truncates the segment back, so a failed commit leaves nothing.
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

Compaction: only the oldest segment is ever deleted, once no current entry lives in it
(removed, or copied forward), so its REMOVE records protect nothing older. When its live
entries are a small share of it (or dead bytes dominate the journal) they are copied forward as
COMMITs with the current envelope into the head and fdatasynced; then the segment is unlinked
and the directory fsynced, one segment at a time. A crash anywhere in between leaves either
the old records alone or both copies, and the newer COMMIT wins.

This class subclasses `Store` only so that code annotated with `Store` (engine, session,
GroupCommitter) accepts it; everything that touches files is overridden, and what is inherited
(begin, commit, enqueue, prepare_commit, hold, release, delete, flush, poke, wakeup_mtime) works
through the overridden methods. TODO: a `SpoolStore` Protocol once those annotations use it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import struct
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from mailgate.errors import SpoolError, SpoolFull, UsageError
from mailgate.spool.entry import Envelope
from mailgate.spool.ids import is_queue_id
from mailgate.spool.store import (
    _HEADER_LIMIT,
    Incoming,
    NotFound,
    RecoveryReport,
    Store,
    _empty_tmp,
    _make_spool_dirs,
    _spool_error,
)

log = logging.getLogger(__name__)

SEGMENT_SIZE = 64 * 1024 * 1024  # a soft limit: a batch may end past it, the next one rotates
_CHUNK = 1024 * 1024  # read/copy block: bounded memory for 50 MB messages
_FILE_MODE = 0o600

_SEGMENT_MAGIC = b"MAILGATE-JRNL-1\n"
_SEGMENT_HEADER = struct.Struct(">16sQ8sI")  # magic, seq, record magic, CRC-32 of the rest
_RECORD_HEADER = struct.Struct(">8sBBHQI")  # magic, type, qid length, 0, payload length, CRC
_CRC_SPAN = _RECORD_HEADER.size - 4  # the header bytes the CRC covers (all but itself)
_LENGTH = struct.Struct(">I")
COMMIT, UPDATE, REMOVE = 1, 2, 3
_KINDS = frozenset({COMMIT, UPDATE, REMOVE})
_MAX_QID = 32  # ids.py accepts up to 32 characters
_MAX_ENVELOPE = 64 * 1024 * 1024  # a length beyond this is damage, not an envelope
_MAX_SEGMENTS = 1_000_000  # bounds the loops that walk segments (seq is 16 digits)
# Commits leave this much of the file system free (at most 1% of it), for the engine's updates
# and removals: in a log, even a removal appends, and only removals let compaction free space.
RESERVE = 8 * 1024 * 1024
# copy_file_range cannot do it here (old kernel, other file system): copy through memory.
_COPY_FALLBACK = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP})


def segment_name(seq: int) -> str:
    return f"{seq:016d}.log"


def _seq_of(name: str) -> int | None:
    stem, dot, ext = name.partition(".")
    if dot and ext == "log" and len(stem) == 16 and stem.isdigit():
        return int(stem)
    return None


# --- records ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Out:
    """One record to append: `parts` in memory, then `length` bytes of `source` (a spilled
    message or a message copied forward) from `offset`, copied in the kernel."""

    parts: list[bytes | bytearray]
    source: int | None = None
    offset: int = 0
    length: int = 0

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.parts) + self.length


def _crc_of_file(fd: int, offset: int, length: int, crc: int) -> int:
    """CRC-32 of `length` bytes of `fd` from `offset`, read in bounded blocks."""
    done = 0
    while done < length:  # bounded: every pass reads at least one byte or raises
        block = os.pread(fd, min(_CHUNK, length - done), offset + done)
        if not block:
            raise OSError(errno.EIO, "file shorter than its recorded length")
        crc = zlib.crc32(block, crc)
        done += len(block)
    return crc


def _encode(
    magic: bytes,
    kind: int,
    qid: str,
    envelope: bytes = b"",
    message: Sequence[bytes | bytearray] = (),
    source: tuple[int, int, int] | None = None,
) -> _Out:
    """A record: COMMIT with envelope and message parts (plus, optionally, `source` =
    (fd, offset, length) whose bytes end the message), UPDATE with envelope, REMOVE."""
    qid_bytes = qid.encode("ascii")
    payload: list[bytes | bytearray] = []
    if kind == COMMIT:
        payload = [_LENGTH.pack(len(envelope)), envelope, *message]
    elif kind == UPDATE:
        payload = [envelope]
    length = sum(len(p) for p in payload) + (source[2] if source else 0)
    head = _RECORD_HEADER.pack(magic, kind, len(qid_bytes), 0, length, 0)
    crc = zlib.crc32(qid_bytes, zlib.crc32(head[:_CRC_SPAN]))
    for part in payload:
        crc = zlib.crc32(part, crc)
    if source is not None:
        crc = _crc_of_file(*source, crc)
    head = head[:_CRC_SPAN] + struct.pack(">I", crc)
    if source is None:
        return _Out([head, qid_bytes, *payload])
    return _Out([head, qid_bytes, *payload], source[0], source[1], source[2])


@dataclass(frozen=True, slots=True)
class _Record:
    """One whole record read back, with a matching CRC."""

    kind: int
    qid: str
    start: int
    end: int
    envelope: bytes  # JSON for COMMIT and UPDATE, b"" for REMOVE
    msg_offset: int = 0
    msg_length: int = 0


_INCOMPLETE = "incomplete"  # runs past the end of the file: a torn append, or a bad length
_BAD = "bad"  # not a record here


def _read_record(fd: int, magic: bytes, pos: int, size: int) -> _Record | str:
    head = os.pread(fd, _RECORD_HEADER.size + _MAX_QID, pos)
    if len(head) < _RECORD_HEADER.size:
        return _INCOMPLETE
    rmagic, kind, qlen, zero, plen, crc = _RECORD_HEADER.unpack_from(head)
    if rmagic != magic or kind not in _KINDS or zero or not 0 < qlen <= _MAX_QID:
        return _BAD
    body = pos + _RECORD_HEADER.size + qlen
    end = body + plen
    if end > size:
        return _INCOMPLETE
    qid_bytes = head[_RECORD_HEADER.size : _RECORD_HEADER.size + qlen]
    qid = qid_bytes.decode("ascii", "replace")
    if len(qid_bytes) != qlen or not is_queue_id(qid):
        return _BAD
    check = zlib.crc32(qid_bytes, zlib.crc32(head[:_CRC_SPAN]))
    envelope = b""
    msg_offset = msg_length = 0
    if kind == REMOVE:
        if plen:
            return _BAD
    elif kind == UPDATE:
        if plen > _MAX_ENVELOPE:
            return _BAD
        envelope = os.pread(fd, plen, body)
        if len(envelope) != plen:
            return _INCOMPLETE
        check = zlib.crc32(envelope, check)
    else:
        first = os.pread(fd, min(plen, _CHUNK), body)
        if len(first) < _LENGTH.size:
            return _BAD if plen < _LENGTH.size else _INCOMPLETE
        (env_length,) = _LENGTH.unpack_from(first)
        if env_length > min(plen - _LENGTH.size, _MAX_ENVELOPE):
            return _BAD
        msg_offset = body + _LENGTH.size + env_length
        msg_length = end - msg_offset
        if len(first) == plen:  # the usual, small record: one read
            envelope = first[_LENGTH.size : _LENGTH.size + env_length]
            check = zlib.crc32(first, check)
        else:
            envelope = os.pread(fd, env_length, body + _LENGTH.size)
            check = zlib.crc32(envelope, zlib.crc32(first[: _LENGTH.size], check))
            try:
                check = _crc_of_file(fd, msg_offset, msg_length, check)
            except OSError:
                return _INCOMPLETE
    if check != crc:
        return _BAD
    return _Record(kind, qid, pos, end, envelope, msg_offset, msg_length)


def _resync(fd: int, magic: bytes, pos: int, size: int) -> int | None:
    """The offset of the next whole record at or after `pos`, or None (a torn tail)."""
    offset = pos
    while offset < size:  # bounded: advances by _CHUNK
        block = os.pread(fd, _CHUNK + len(magic) - 1, offset)
        if not block:
            return None
        hit = block.find(magic)
        while hit >= 0:  # bounded: find() moves forward within the block
            if isinstance(_read_record(fd, magic, offset + hit, size), _Record):
                return offset + hit
            hit = block.find(magic, hit + 1)
        offset += _CHUNK
    return None


@dataclass(slots=True)
class _Scan:
    records: list[_Record] = field(default_factory=list)
    end: int = 0  # after the last whole record
    bad: list[tuple[int, int]] = field(default_factory=list)  # skipped (start, end) regions
    torn_at: int | None = None  # where an incomplete tail starts


def _scan(fd: int, magic: bytes, start: int, size: int) -> _Scan:
    found = _Scan(end=start)
    pos = start
    while pos < size:  # bounded: pos strictly increases
        record = _read_record(fd, magic, pos, size)
        if isinstance(record, _Record):
            found.records.append(record)
            pos = found.end = record.end
            continue
        resume = _resync(fd, magic, pos + 1, size)
        if resume is None:
            found.torn_at = pos
            break
        found.bad.append((pos, resume))
        pos = resume
    return found


def _segment_header(seq: int, magic: bytes) -> bytes:
    head = _SEGMENT_HEADER.pack(_SEGMENT_MAGIC, seq, magic, 0)
    crc = zlib.crc32(head[: _SEGMENT_HEADER.size - 4])
    return head[: _SEGMENT_HEADER.size - 4] + struct.pack(">I", crc)


def _read_segment_header(fd: int, seq: int) -> bytes | None:
    """The record magic of a whole, matching segment header, or None."""
    head = os.pread(fd, _SEGMENT_HEADER.size, 0)
    if len(head) < _SEGMENT_HEADER.size:
        return None
    smagic, hseq, magic, crc = _SEGMENT_HEADER.unpack(head)
    if smagic != _SEGMENT_MAGIC or hseq != seq:
        return None
    if zlib.crc32(head[: _SEGMENT_HEADER.size - 4]) != crc:
        return None
    return bytes(magic)


# --- file helpers ---------------------------------------------------------------------


def _write_counted(fd: int, data: bytes) -> tuple[int, OSError | None]:
    """Write all of `data`; return how much was written and the error that stopped it."""
    view = memoryview(data)
    written = 0
    while written < len(view):  # bounded: every write makes progress or ends the loop
        try:
            n = os.write(fd, view[written:])
        except OSError as e:
            return written, e
        if n <= 0:
            return written, OSError(errno.EIO, "write made no progress")
        written += n
    return written, None


def _write_all(fd: int, data: bytes) -> None:
    _, error = _write_counted(fd, data)
    if error is not None:
        raise error


def _copy(source: int, target: int, offset: int, length: int) -> None:
    """Append `length` bytes of `source` from `offset` at `target`'s position, in the kernel
    when it can (no trip through Python memory for a 50 MB message)."""
    done = 0
    in_kernel = True
    while done < length:  # bounded: every pass copies at least one byte or raises
        count = min(length - done, 16 * _CHUNK)
        if in_kernel:
            try:
                n = os.copy_file_range(source, target, count, offset + done)
            except OSError as e:
                if e.errno not in _COPY_FALLBACK:
                    raise
                in_kernel = False
                continue
        else:
            block = os.pread(source, min(count, _CHUNK), offset + done)
            if block:
                _write_all(target, block)
            n = len(block)
        if n <= 0:
            raise OSError(errno.EIO, "source shorter than its recorded length")
        done += n


def _is_prefix_of(path: Path, fd: int, size: int) -> bool:
    """Whether the file at `path` holds the first bytes of `fd` (which has `size` bytes)."""
    with open(path, "rb") as f:
        offset = 0
        while block := f.read(_CHUNK):  # bounded by the file's size
            if offset + len(block) > size or os.pread(fd, len(block), offset) != block:
                return False
            offset += len(block)
    return offset > 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError as e:  # closing a read descriptor cannot lose data
            log.debug("spool journal: close failed: %s", e)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as e:  # cleanup must never hide the error that made us clean up
        log.warning("spool cleanup failed path=%s error=%s", path, e.strerror)


def _release_incoming(incoming: Incoming) -> None:
    """Free what a committed (or failed) incoming message still holds: fd, spill file, memory."""
    incoming._close_fd()
    if incoming._buffer is None:
        _unlink_quietly(incoming.spill_path)
    incoming._buffer = bytearray()


# --- the index --------------------------------------------------------------------------


@dataclass(slots=True)
class _Segment:
    seq: int
    path: Path
    fd: int | None = None  # for pread; closed once no current entry lives here
    wfd: int | None = None  # the head's write descriptor, opened by a writer
    magic: bytes | None = None  # None until a whole header was read
    end: int = 0  # after the last whole record read or written
    seen: int = 0  # the size at the last read: a different size means news
    live: int = 0  # entries whose current COMMIT is here
    live_bytes: int = 0
    needs_dir_sync: bool = False  # created by this instance; its name is not durable yet


@dataclass(slots=True)
class _Entry:
    segment: int  # where the current COMMIT (and so the message bytes) is
    offset: int  # of the message bytes
    length: int
    weight: int  # bytes of the COMMIT record
    raw: bytes  # the envelope JSON as stored
    envelope: Envelope | None = None  # parsed on first use


@dataclass(eq=False, slots=True)
class _Change:
    """An update (`change`) or a removal (`change` None) waiting for the lock."""

    qid: str
    change: Callable[[Envelope], Envelope] | None
    done: bool = False
    result: Envelope | None = None
    error: BaseException | None = None


@dataclass(slots=True)
class _Findings:
    """What reading the journal in recover() found (for RecoveryReport and the log)."""

    orphans: list[str] = field(default_factory=list)
    damaged: set[int] = field(default_factory=set)  # segments with a skipped region


# --- the store -------------------------------------------------------------------------


class JournalStore(Store):
    """The spool as a log of records. Safe to use from several threads and several processes."""

    def __init__(self, path: Path, *, segment_size: int = SEGMENT_SIZE) -> None:
        # Not Store.__init__: that would make msg/ and env/, which this backend does not use.
        self.path = Path(path)
        self.tmp_dir = self.path / "tmp"
        self.journal_dir = self.path / "journal"
        self.corrupt_dir = self.path / "corrupt"
        self.wakeup_path = self.path / "wakeup"
        self.lock_path = self.path / "journal.lock"
        self.segment_size = segment_size
        self._owner = _make_spool_dirs(
            self.path, (self.tmp_dir, self.journal_dir, self.corrupt_dir)
        )
        # Guards the index and the segment table. Order: a flock first, then this, never the
        # other way round (a thread waiting in flock must not hold it).
        self._mutex = threading.RLock()
        self._segments: dict[int, _Segment] = {}
        self._index: dict[str, _Entry] = {}
        self._queue_lock = threading.Lock()
        self._changes: list[_Change] = []  # update()/remove() calls waiting for the flock
        try:
            with self._flock(fcntl.LOCK_SH), self._mutex:
                self._rebuild(repair=False, findings=None)
        except OSError as e:
            raise _spool_error(e, f"reading spool journal {self.journal_dir}") from None

    def close(self) -> None:
        """Close the segment descriptors (the object is unusable afterwards)."""
        with self._mutex:
            for seg in self._segments.values():
                _close(seg.fd)
                _close(seg.wfd)
                seg.fd = seg.wfd = None
            self._segments.clear()
            self._index.clear()

    # -- paths: none per entry ------------------------------------------------------------

    def message_path(self, qid: str) -> Path:
        raise UsageError("the journal spool keeps no file per message; use read_message()")

    def envelope_path(self, qid: str) -> Path:
        raise UsageError("the journal spool keeps no file per envelope; use load()")

    def _taken(self, qid: str) -> bool:
        # Store.begin() asks; commit_batch() checks again under the lock, after tailing. No
        # stat of spool/tmp/ per message: an in-flight message of another process with the
        # same id (36**-5 per pair in one millisecond) could only clash by spilling there,
        # and Incoming creates its spill file with O_EXCL, so that session gets a 451.
        with self._mutex:
            return qid in self._index

    # -- locking and tailing ----------------------------------------------------------------

    @contextmanager
    def _flock(self, mode: int) -> Iterator[None]:
        # A descriptor per acquisition: flock locks belong to the open file description, so
        # two threads sharing one would not exclude each other.
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(self.lock_path, flags, _FILE_MODE)
        try:
            if self._owner is not None:
                os.fchown(fd, *self._owner)
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # also releases the lock

    def _head(self) -> _Segment | None:
        return self._segments[max(self._segments)] if self._segments else None

    def _news(self) -> bool:
        """Whether another process may have appended (cheap: an fstat and a stat)."""
        with self._mutex:  # the fstat too: a descriptor number must not be reused under it
            head = self._head()
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
                with self._flock(fcntl.LOCK_SH), self._mutex:
                    self._tail(repair=False, findings=None)
        except OSError as e:
            raise _spool_error(e, f"reading spool journal {self.journal_dir}") from None

    def _rebuild(self, *, repair: bool, findings: _Findings | None) -> None:
        """Forget everything and read the whole journal (under a flock and the mutex)."""
        for seg in self._segments.values():
            _close(seg.fd)
            _close(seg.wfd)
        self._segments.clear()
        self._index.clear()
        seqs = sorted(s for n in os.listdir(self.journal_dir) if (s := _seq_of(n)) is not None)
        for n, seq in enumerate(seqs):
            opened = self._open_segment(seq)
            if opened is None:
                continue  # gone since listdir(): an operator's doing; nothing else deletes
            self._read_new(opened, repair=repair, last=n == len(seqs) - 1, findings=findings)
        head = self._head()
        for seg in self._segments.values():
            if seg.live == 0 and seg is not head:
                _close(seg.fd)  # nothing will be read from it again
                seg.fd = None

    def _open_segment(self, seq: int) -> _Segment | None:
        path = self.journal_dir / segment_name(seq)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        seg = self._segments[seq] = _Segment(seq, path, fd)
        return seg

    def _tail(self, *, repair: bool, findings: _Findings | None) -> None:
        """Apply new records of the head segment and of any segment after it."""
        for _ in range(_MAX_SEGMENTS):
            head = self._head()
            if head is None:
                if (self.journal_dir / segment_name(1)).exists():
                    self._rebuild(repair=repair, findings=findings)
                return
            nxt = self.journal_dir / segment_name(head.seq + 1)
            has_next = nxt.exists()  # before reading: then the head is complete when read
            if head.fd is None or os.fstat(head.fd).st_nlink == 0:
                # The head we knew was compacted away: we missed segments, start over.
                self._rebuild(repair=repair, findings=findings)
                return
            self._read_new(head, repair=repair, last=not has_next, findings=findings)
            if not has_next or self._open_segment(head.seq + 1) is None:
                if has_next:  # appeared and vanished: compaction ran, start over
                    self._rebuild(repair=repair, findings=findings)
                return
            if head.live == 0:
                _close(head.fd)
                head.fd = None
            _close(head.wfd)
            head.wfd = None
        raise SpoolError("spool journal: too many segments")

    def _read_new(
        self, seg: _Segment, *, repair: bool, last: bool, findings: _Findings | None
    ) -> None:
        """Apply the records appended to `seg` since seg.end."""
        assert seg.fd is not None
        size = os.fstat(seg.fd).st_size
        if seg.magic is None:
            seg.magic = _read_segment_header(seg.fd, seg.seq)
            if seg.magic is None:
                seg.seen = size
                # The last segment's header may be torn by a crash right after creating it
                # (no record was acknowledged in it yet); anything else is damage.
                if findings is not None and (not last or size > _SEGMENT_HEADER.size):
                    findings.damaged.add(seg.seq)
                    log.error("spool journal: %s has no valid header", seg.path.name)
                return
            seg.end = _SEGMENT_HEADER.size
        if size == seg.end:
            seg.seen = size
            return
        found = _scan(seg.fd, seg.magic, seg.end, size)
        for record in found.records:
            self._apply(seg, record)
        for start, stop in found.bad:
            log.error("spool journal: %s: damaged bytes %d-%d skipped", seg.path.name, start, stop)
            if findings is not None:
                findings.damaged.add(seg.seq)
        seg.end = found.end
        seg.seen = size
        if found.torn_at is not None and repair:
            # An append that never finished (and so was never acknowledged): cut it away,
            # before anyone appends after it and turns it into damage in the middle.
            qid = self._torn_qid(seg, found.torn_at)
            log.warning(
                "spool journal: %s: cut %d bytes of an unfinished append at %d%s",
                seg.path.name, size - found.torn_at, found.torn_at,
                f" qid={qid}" if qid else "",
            )  # fmt: skip
            if findings is not None and qid:
                findings.orphans.append(qid)
            self._truncate(seg, found.torn_at, sync=True)

    def _torn_qid(self, seg: _Segment, pos: int) -> str:
        assert seg.fd is not None and seg.magic is not None
        head = os.pread(seg.fd, _RECORD_HEADER.size + _MAX_QID, pos)
        if len(head) < _RECORD_HEADER.size or head[:8] != seg.magic:
            return ""
        qlen = head[9]
        if len(head) < _RECORD_HEADER.size + qlen:
            return ""  # cut inside the qid: not worth guessing
        qid = head[_RECORD_HEADER.size : _RECORD_HEADER.size + qlen].decode("ascii", "replace")
        return qid if head[8] == COMMIT and is_queue_id(qid) else ""

    def _apply(self, seg: _Segment, record: _Record) -> None:
        old = self._index.get(record.qid)
        if record.kind == COMMIT:
            if old is not None:
                self._unlive(old)
            weight = record.end - record.start
            self._index[record.qid] = _Entry(
                seg.seq, record.msg_offset, record.msg_length, weight, record.envelope
            )
            seg.live += 1
            seg.live_bytes += weight
        elif record.kind == UPDATE:
            if old is not None:  # else: removed later in a segment compacted away; harmless
                old.raw, old.envelope = record.envelope, None
        elif old is not None:
            self._unlive(old)
            del self._index[record.qid]

    def _unlive(self, entry: _Entry) -> None:
        seg = self._segments.get(entry.segment)
        if seg is None:
            return
        seg.live -= 1
        seg.live_bytes -= entry.weight
        if seg.live == 0 and seg is not self._head():
            _close(seg.fd)  # nothing will be read from it again
            seg.fd = None

    # -- writing ------------------------------------------------------------------------

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """The exclusive flock, with the index brought up to date (and torn tails cut)."""
        with self._flock(fcntl.LOCK_EX):
            with self._mutex:
                self._tail(repair=True, findings=None)
            yield

    def _writable_head(self) -> _Segment:
        """The head segment, open for writing at its end; a new one when it is full."""
        head = self._head()
        # A head whose header never got written whole (a crash right after creating it)
        # holds no record: write the header again. One with bytes after a bad header is
        # damage: leave it for recover() (which copies it to corrupt/), start a new segment.
        if (
            head is not None
            and head.magic is None
            and head.fd is not None
            and os.fstat(head.fd).st_size <= _SEGMENT_HEADER.size
        ):
            self._rewrite_header(head)
        if head is None or head.end >= self.segment_size or head.magic is None:
            if head is not None:
                _close(head.wfd)
                head.wfd = None
            return self._create_segment(1 if head is None else head.seq + 1)
        if head.wfd is None:
            head.wfd = os.open(head.path, os.O_WRONLY | os.O_CLOEXEC)
        os.lseek(head.wfd, head.end, os.SEEK_SET)
        return head

    def _create_segment(self, seq: int) -> _Segment:
        path = self.journal_dir / segment_name(seq)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        wfd = os.open(path, flags, _FILE_MODE)
        magic = secrets.token_bytes(8)
        try:
            if self._owner is not None:
                os.fchown(wfd, *self._owner)
            _write_all(wfd, _segment_header(seq, magic))
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            os.close(wfd)
            _unlink_quietly(path)
            raise
        size = _SEGMENT_HEADER.size
        seg = _Segment(seq, path, fd, wfd, magic, size, size, needs_dir_sync=True)
        with self._mutex:
            self._segments[seq] = seg
        log.debug("spool journal: started %s", path.name)
        return seg

    def _rewrite_header(self, seg: _Segment) -> None:
        _close(seg.wfd)
        seg.wfd = None
        wfd = os.open(seg.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            magic = secrets.token_bytes(8)
            os.ftruncate(wfd, 0)
            _write_all(wfd, _segment_header(seg.seq, magic))
        except BaseException:
            os.close(wfd)
            raise
        seg.wfd, seg.magic = wfd, magic
        seg.end = seg.seen = _SEGMENT_HEADER.size
        seg.needs_dir_sync = True

    def _truncate(self, seg: _Segment, size: int, *, sync: bool = False) -> None:
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

    def _write_outs(self, seg: _Segment, outs: Sequence[_Out]) -> list[int | OSError]:
        """Append records at seg.end: in-memory runs with one write each, streamed ones by
        copy. Returns each record's offset, or the error that failed it (its bytes are cut
        away again; the records before it stay). Not yet durable: see _sync()."""
        assert seg.wfd is not None
        results: list[int | OSError] = [OSError(errno.EIO, "not written")] * len(outs)
        i = 0
        while i < len(outs):  # bounded: i grows every pass
            if outs[i].source is None:
                j = i
                while j < len(outs) and outs[j].source is None:
                    j += 1
                data = b"".join(p for out in outs[i:j] for p in out.parts)
                written, error = _write_counted(seg.wfd, data)
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
                    _write_all(seg.wfd, b"".join(out.parts))
                    _copy(out.source, seg.wfd, out.offset, out.length)
                except OSError as e:
                    results[i] = e
                else:
                    results[i] = seg.end
                    seg.end += out.size
                    i += 1
                    continue
                i += 1
            try:
                self._truncate(seg, seg.end)
            except OSError as e:
                # The failed bytes stay: fail the rest too; the next writer cuts them away
                # as a torn tail (or recover() skips them as damage).
                log.error("spool journal: %s: cannot cut a failed append: %s", seg.path.name, e)
                for k in range(i, len(outs)):
                    results[k] = e
                break
        seg.seen = seg.end
        return results

    def _room_for(self, size: int) -> bool:
        """Whether `size` more bytes leave the reserve free (see RESERVE)."""
        st = os.statvfs(self.journal_dir)
        reserve = min(RESERVE, st.f_blocks * st.f_frsize // 100)
        return st.f_bavail * st.f_frsize - size >= reserve

    def _sync(self, seg: _Segment, start: int) -> None:
        """Make seg's appends since `start` durable, or cut them away and raise OSError."""
        assert seg.wfd is not None
        try:
            os.fdatasync(seg.wfd)
            if seg.needs_dir_sync:
                _fsync_dir(self.journal_dir)
                seg.needs_dir_sync = False
        except OSError:
            try:
                self._truncate(seg, start)
            except OSError as e:
                log.error("spool journal: %s: cannot cut an unsynced append: %s", seg.path, e)
            raise

    def _append_one(self, out: _Out) -> tuple[_Segment, int]:
        """Append one record durably (under the exclusive flock); return where it is."""
        seg = self._writable_head()
        start = seg.end
        [result] = self._write_outs(seg, [out])
        if isinstance(result, OSError):
            raise result
        self._sync(seg, start)
        return seg, result

    # -- committing --------------------------------------------------------------------

    def commit_batch(
        self, items: Sequence[tuple[Incoming, Envelope, bytes]]
    ) -> list[Envelope | Exception]:
        """Commit several entries with one write and one fdatasync.

        Returns one result per item, in order: the stored envelope or the exception for that
        entry. One entry's failure (its write hit a full disk) fails only that entry; a
        failed fdatasync is shared, so it fails every entry of the batch and leaves nothing.
        """
        results, claimed = self._claim_batch(items)
        if not claimed:
            return results
        sources: list[int] = []
        try:
            with self._writing():
                self._commit_locked(claimed, results, sources)
        except OSError as e:
            error = _spool_error(e, "commit")
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
                _release_incoming(incoming)
        return results

    def _commit_locked(
        self,
        claimed: list[tuple[int, Incoming, Envelope, bytes]],
        results: list[Envelope | Exception],
        sources: list[int],
    ) -> None:
        seg = self._writable_head()
        assert seg.magic is not None
        outs: list[_Out] = []
        staged: list[tuple[int, Envelope, bytes]] = []
        for index, incoming, envelope, prefix in claimed:
            qid = incoming.qid
            if incoming._error is not None:
                results[index] = incoming._error
                continue
            if qid in self._index:
                results[index] = SpoolError(f"qid={qid}: queue id already in use")
                continue
            stored = replace(envelope, id=qid, size=len(prefix) + incoming.size)
            try:
                raw = stored.to_json()
                if incoming._buffer is not None:
                    out = _encode(seg.magic, COMMIT, qid, raw, (prefix, incoming._buffer))
                else:
                    incoming._close_fd()
                    src = os.open(incoming.spill_path, os.O_RDONLY | os.O_CLOEXEC)
                    sources.append(src)
                    source = (src, 0, incoming.size)
                    out = _encode(seg.magic, COMMIT, qid, raw, (prefix,), source)
            except OSError as e:
                results[index] = _spool_error(e, f"qid={qid} commit")
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
        written = self._write_outs(seg, outs)
        done: list[tuple[int, Envelope, bytes, int, int]] = []
        for (index, stored, raw), out, where in zip(staged, outs, written, strict=True):
            if isinstance(where, OSError):
                results[index] = _spool_error(where, f"qid={stored.id} commit")
            else:
                done.append((index, stored, raw, where, out.size))
        if not done:
            return
        try:
            self._sync(seg, start)
        except OSError as e:
            error = _spool_error(e, "commit: fdatasync of the spool journal")
            log.error("spool commit failed for %d entries: %s", len(done), error)
            for index, *_ in done:
                results[index] = error
            return
        with self._mutex:
            for index, stored, raw, where, weight in done:
                qid = stored.id
                offset = where + _RECORD_HEADER.size + len(qid) + _LENGTH.size + len(raw)
                self._index[qid] = _Entry(seg.seq, offset, stored.size, weight, raw, stored)
                seg.live += 1
                seg.live_bytes += weight
                results[index] = stored
                log.debug("qid=%s committed size=%d", qid, stored.size)

    # -- reading ------------------------------------------------------------------------

    def ids(self) -> list[str]:
        """Queue ids of committed entries, oldest first (ids sort by time of arrival)."""
        self._refresh()
        with self._mutex:
            return sorted(self._index)

    def load(self, qid: str) -> Envelope:
        """The committed envelope; NotFound if there is none, SpoolError if it does not parse."""
        self._checked(qid)
        self._refresh()
        with self._mutex:
            entry = self._index.get(qid)
            if entry is None:
                raise NotFound(f"no such queue entry: {qid}")
            return self._envelope(qid, entry)

    def _envelope(self, qid: str, entry: _Entry) -> Envelope:
        if entry.envelope is None:
            entry.envelope = self._parse(qid, entry.raw)
        return entry.envelope

    def read_message(self, qid: str) -> bytes:
        return self._read(qid, None)

    def read_headers(self, qid: str, limit: int = _HEADER_LIMIT) -> bytes:
        """The message's header section (up to and excluding the empty line), at most `limit`
        bytes, without reading a large body."""
        head = self._read(qid, limit)
        if head.startswith(b"\r\n"):
            return b""
        end = head.find(b"\r\n\r\n")
        return head if end < 0 else head[: end + 2]

    def _read(self, qid: str, limit: int | None) -> bytes:
        # No refresh first: the engine calls this on its event loop for entries it knows,
        # and must not wait there for another process's fdatasync. Unknown: refresh, retry.
        self._checked(qid)
        for attempt in range(2):
            fd = -1
            with self._mutex:
                entry = self._index.get(qid)
                if entry is not None:
                    seg = self._segments[entry.segment]
                    assert seg.fd is not None  # open while a current entry lives there
                    length = entry.length if limit is None else min(limit, entry.length)
                    try:
                        if length <= _CHUNK:
                            return self._pread(seg.fd, length, entry.offset)
                        # Large: read outside the mutex, from a descriptor of our own that
                        # a compaction meanwhile cannot close.
                        fd, offset = os.dup(seg.fd), entry.offset
                    except OSError as e:
                        raise _spool_error(e, f"qid={qid} reading message") from None
            if fd >= 0:
                try:
                    return self._pread(fd, length, offset)
                except OSError as e:
                    raise _spool_error(e, f"qid={qid} reading message") from None
                finally:
                    os.close(fd)
            if attempt == 0:
                self._refresh()
        raise NotFound(f"no such queue entry: {qid}")

    @staticmethod
    def _pread(fd: int, length: int, offset: int) -> bytes:
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise OSError(errno.EIO, "spool journal shorter than its index")
        return data

    # -- changing -----------------------------------------------------------------------

    def update(self, qid: str, change: Callable[[Envelope], Envelope]) -> Envelope:
        """Apply `change` to the stored envelope under the exclusive lock and append the result
        (fdatasynced before returning). Returns the new envelope.

        Concurrent update() and remove() calls of one instance share a write and an fdatasync:
        whichever thread gets the lock applies every change queued so far, in order. So
        `change` may run in another thread of this process; it must only compute."""
        self._checked(qid)
        new = self._change(_Change(qid, change))
        assert new is not None
        return new

    def remove(self, qid: str) -> None:
        """Delete an entry: a REMOVE record, batched with concurrent updates and removals; it is
        fdatasynced with them when the batch has an update, else by the next commit's
        fdatasync (see the module docstring)."""
        self._checked(qid)
        self._change(_Change(qid, None))
        log.debug("qid=%s removed", qid)

    def _change(self, request: _Change) -> Envelope | None:
        # Queue first, then wait for the lock: whoever holds it next applies everything
        # queued, so when we get it our request is either done or still in the queue.
        with self._queue_lock:
            self._changes.append(request)
        try:
            with self._writing():
                if not request.done:
                    with self._queue_lock:
                        batch, self._changes = self._changes, []
                    self._apply_changes(batch)
        except OSError as e:
            with self._queue_lock:
                if request in self._changes:
                    self._changes.remove(request)
            raise _spool_error(e, f"qid={request.qid} changing entry") from None
        if request.error is not None:
            raise request.error
        return request.result

    def _apply_changes(self, batch: list[_Change]) -> None:
        """Under the exclusive flock: one write and one fdatasync for a batch of changes.
        Every request ends done, with its result or its own error."""
        try:
            self._apply_changes_locked(batch)
        except OSError as e:
            for request in batch:
                if not request.done:
                    request.error = _spool_error(e, f"qid={request.qid} changing entry")
        except BaseException as e:
            for request in batch:
                if not request.done:
                    request.error = SpoolError(f"qid={request.qid}: change failed: {e!r}")
            raise
        finally:
            for request in batch:
                request.done = True

    def _apply_changes_locked(self, batch: list[_Change]) -> None:
        head = self._writable_head()
        assert head.magic is not None
        current: dict[str, Envelope | None] = {}  # this batch's effect so far; None: removed
        outs: list[_Out] = []
        planned: list[tuple[_Change, bytes]] = []
        for request in batch:
            qid = request.qid
            entry = self._index.get(qid)
            try:
                if qid in current:
                    before = current[qid]
                elif entry is not None:
                    before = self._envelope(qid, entry)
                else:
                    before = None
                if before is None:
                    raise NotFound(f"no such queue entry: {qid}")
                if request.change is None:
                    current[qid] = None
                    outs.append(_encode(head.magic, REMOVE, qid))
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
            outs.append(_encode(head.magic, UPDATE, qid, raw))
            planned.append((request, raw))
        if not outs:
            return
        start = head.end
        written = self._write_outs(head, outs)
        failed = next((w for w in written if isinstance(w, OSError)), None)
        if failed is not None:
            self._truncate(head, start)  # all or nothing: the changes may depend on each other
            raise failed
        if head.needs_dir_sync or any(request.change is not None for request, _ in planned):
            self._sync(head, start)
        with self._mutex:
            for request, raw in planned:
                entry = self._index.get(request.qid)
                assert entry is not None
                if request.change is None:
                    self._unlive(self._index.pop(request.qid))
                else:
                    entry.raw, entry.envelope = raw, request.result
                request.done = True
        self._maybe_compact()

    # -- compaction ---------------------------------------------------------------------

    def compact(self) -> int:
        """Delete (after copying forward what still lives there) as many of the oldest
        segments as the policy allows; returns how many. The engine's removals do this as
        they go; this is for tests and operators."""
        try:
            with self._writing():
                return self._compact()
        except OSError as e:
            raise _spool_error(e, "compacting the spool journal") from None

    def _maybe_compact(self) -> None:
        # After a removal or an update that already succeeded: a failure here is logged only.
        head = self._head()
        if len(self._segments) < 2 or head is None:
            return
        try:
            self._compact()
        except (OSError, SpoolError) as e:
            log.warning("spool journal compaction failed: %s", e)

    def _compact(self) -> int:
        """Under the exclusive flock, index up to date."""
        deleted = 0
        for _ in range(len(self._segments)):
            if len(self._segments) < 2:
                break
            oldest = self._segments[min(self._segments)]
            if oldest.magic is None:
                break  # unreadable: never delete it here; recover() moves it to corrupt/
            if oldest.live:
                total = sum(s.end for s in self._segments.values())
                live = sum(s.live_bytes for s in self._segments.values())
                # Copy forward when little lives here, or when dead bytes dominate the journal
                # (bounds the disk a long-deferred backlog can pin to about twice its size).
                cheap = oldest.live_bytes * 4 <= oldest.end
                if not cheap and total <= 2 * live + 2 * self.segment_size:
                    break
                self._copy_forward(oldest)
            self._delete_segment(oldest)
            deleted += 1
        return deleted

    def _copy_forward(self, seg: _Segment) -> None:
        assert seg.fd is not None
        with self._mutex:
            moving = [(q, e) for q, e in self._index.items() if e.segment == seg.seq]
        head = self._writable_head()
        assert head.magic is not None
        start = head.end
        outs = []
        for qid, entry in moving:
            source = (seg.fd, entry.offset, entry.length)
            outs.append(_encode(head.magic, COMMIT, qid, entry.raw, (), source))
        written = self._write_outs(head, outs)
        failed = next((w for w in written if isinstance(w, OSError)), None)
        if failed is not None:
            self._truncate(head, start)
            raise failed
        self._sync(head, start)
        with self._mutex:
            for (qid, entry), out, where in zip(moving, outs, written, strict=True):
                assert isinstance(where, int)
                self._unlive(entry)
                offset = where + _RECORD_HEADER.size + len(qid) + _LENGTH.size + len(entry.raw)
                self._index[qid] = _Entry(
                    head.seq, offset, entry.length, out.size, entry.raw, entry.envelope
                )
                head.live += 1
                head.live_bytes += out.size
        log.info("spool journal: copied %d entries forward from %s", len(moving), seg.path.name)

    def _delete_segment(self, seg: _Segment) -> None:
        os.unlink(seg.path)
        # Durable before the next deletion: if this segment came back after a crash while a
        # newer one holding its REMOVE records did not, removed entries would come back.
        _fsync_dir(self.journal_dir)
        with self._mutex:
            _close(seg.fd)
            _close(seg.wfd)
            del self._segments[seg.seq]
        log.debug("spool journal: deleted %s", seg.path.name)

    # -- startup ------------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Repair what an interrupted run left behind (call before serving).

        tmp/ is emptied; a torn append at the end of a segment is cut away (its sender never
        got 250); a segment with damaged records is copied to corrupt/ and what parses is
        kept; an entry whose envelope does not parse is written out to corrupt/ (as
        <qid>.json and <qid>.eml) and removed; entries still in a files-format spool (env/
        and msg/) are moved into the journal; then the journal is compacted.
        """
        try:
            tmp_removed = _empty_tmp(self.tmp_dir)
            findings = _Findings()
            corrupt: list[str] = []
            with self._flock(fcntl.LOCK_EX):
                with self._mutex:
                    self._rebuild(repair=True, findings=findings)
                for seq in sorted(findings.damaged):
                    self._keep_damaged(self._segments[seq])
                corrupt = self._export_corrupt()
                self._import_files_format()
                self._compact()
            # Only what changed (a clean start then costs no fsync): segments deleted or cut
            # were made durable as that happened.
            if tmp_removed:
                _fsync_dir(self.tmp_dir)
            if findings.damaged or corrupt:
                _fsync_dir(self.corrupt_dir)
                _fsync_dir(self.journal_dir)
        except OSError as e:
            raise _spool_error(e, f"spool recovery in {self.path}") from None
        report = RecoveryReport(
            len(self._index), tmp_removed, tuple(findings.orphans), tuple(corrupt)
        )
        log.debug("spool recovery %s", report)
        return report

    def _corrupt_target(self, name: str) -> Path:
        target = self.corrupt_dir / name
        # Never overwrite what an operator has not looked at yet. Bounded: names are finite.
        for n in range(1, 1000):
            if not target.exists():
                break
            target = self.corrupt_dir / f"{name}.{n}"
        return target

    def _keep_damaged(self, seg: _Segment) -> None:
        """Keep a damaged segment for the operator: a copy in corrupt/ (what parses stays in
        use), or, when not even its header reads, the segment itself (the head is copied
        instead; a writer then starts a new segment after it: see _writable_head)."""
        if seg.magic is None and seg is not self._head():
            target = self._corrupt_target(seg.path.name)
            os.rename(seg.path, target)
            with self._mutex:
                _close(seg.fd)
                del self._segments[seg.seq]
            log.error("spool journal: unreadable segment moved to %s", target)
            return
        self._keep_copy(seg.path)

    def _keep_copy(self, path: Path) -> None:
        """Copy a damaged segment to corrupt/, unless an earlier startup did (a copy that is
        a prefix of it: the segment has only grown since)."""
        size = os.stat(path).st_size
        src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for n in range(1000):  # bounded, like _corrupt_target's names
                earlier = self.corrupt_dir / (path.name if n == 0 else f"{path.name}.{n}")
                if not earlier.exists():
                    break
                if _is_prefix_of(earlier, src, size):
                    return
            target = self._corrupt_target(path.name)
            dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
            try:
                _copy(src, dst, 0, size)
                os.fsync(dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        log.error("spool journal: damaged segment copied to %s", target)

    def _export_corrupt(self) -> list[str]:
        """Entries whose envelope does not parse (or names another id): to corrupt/, removed."""
        bad: list[str] = []
        with self._mutex:
            for qid, entry in sorted(self._index.items()):
                try:
                    self._envelope(qid, entry)
                except SpoolError as e:
                    log.warning("qid=%s spool recovery: moved to corrupt/: %s", qid, e)
                    bad.append(qid)
        for qid in bad:
            entry = self._index[qid]
            seg = self._segments[entry.segment]
            assert seg.fd is not None
            self._write_corrupt(f"{qid}.json", entry.raw)
            self._write_corrupt(f"{qid}.eml", self._pread(seg.fd, entry.length, entry.offset))
            head = self._writable_head()
            assert head.magic is not None
            self._append_one(_encode(head.magic, REMOVE, qid))
            with self._mutex:
                self._unlive(self._index.pop(qid))
        return bad

    def _write_corrupt(self, name: str, data: bytes) -> None:
        target = self._corrupt_target(name)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _import_files_format(self) -> None:
        """Move entries of a files-format spool (store.py) into the journal, so that switching
        spool.format loses no queued mail. Journal first (fdatasynced), then the files go: a
        crash in between imports the same entry again, and the newer COMMIT wins."""
        env_dir, msg_dir = self.path / "env", self.path / "msg"
        if not env_dir.is_dir():
            return
        imported = 0
        for name in sorted(os.listdir(env_dir)):
            qid = name.removesuffix(".json")
            if not name.endswith(".json") or not is_queue_id(qid):
                continue
            env_path, msg_path = env_dir / name, msg_dir / f"{qid}.eml"
            if qid in self._index:  # imported before a crash; the journal is newer
                _unlink_quietly(env_path)
                _unlink_quietly(msg_path)
                continue
            raw = env_path.read_bytes()
            try:
                self._parse(qid, raw)
                src = os.open(msg_path, os.O_RDONLY | os.O_CLOEXEC)
            except (SpoolError, FileNotFoundError) as e:
                log.warning("qid=%s spool recovery: files-format entry left in place: %s", qid, e)
                continue
            try:
                head = self._writable_head()
                assert head.magic is not None
                source = (src, 0, os.fstat(src).st_size)
                seg, where = self._append_one(_encode(head.magic, COMMIT, qid, raw, (), source))
            finally:
                os.close(src)
            offset = where + _RECORD_HEADER.size + len(qid) + _LENGTH.size + len(raw)
            weight = offset - where + source[2]
            with self._mutex:
                self._index[qid] = _Entry(seg.seq, offset, source[2], weight, raw)
                seg.live += 1
                seg.live_bytes += weight
            env_path.unlink()  # env first: a msg without env is what store.py cleans up
            msg_path.unlink()
            imported += 1
        if imported:
            _fsync_dir(env_dir)
            _fsync_dir(msg_dir)
            log.info("spool recovery: imported %d files-format entries into the journal", imported)

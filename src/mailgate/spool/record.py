"""The journal's on-disk format: segment headers and records, encoded and read back.

Owns: the byte layout below, its CRCs, and reading records back from any byte source (a
`Read` callable), so the format is tested and fuzzed on plain bytes. Must not: open, write or
sync files (spool/journal.py does), or interpret envelopes.

A segment (spool/journal/<seq>.log, seq: 16 decimal digits) starts with a 36-byte header
(b"MAILGATE-JRNL-1\\n", seq, an 8-byte random record magic, CRC-32), then records:
  [magic 8][type 1][qid length 1][zero 2][payload length 8][CRC-32 4][qid][payload]
  COMMIT  payload [envelope length 4][envelope JSON][message bytes]
  UPDATE  payload  the whole envelope JSON
  REMOVE  payload  empty
The CRC covers the header fields, the qid and the payload. The magic is random per segment, so
a message that quotes a record (a crafted body) can never be taken for one. A record counts
only when it is whole and its CRC matches; one that runs past the end of the data is
INCOMPLETE (a torn append), anything else that does not parse is BAD (damage).
"""

from __future__ import annotations

import errno
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mailgate.spool.ids import is_queue_id

# Read(length, offset) -> at most `length` bytes from `offset` (fewer at the end): os.pread
# with the descriptor bound, or a slice of bytes in tests.
Read = Callable[[int, int], bytes]

SEGMENT_MAGIC = b"MAILGATE-JRNL-1\n"
SEGMENT_HEADER = struct.Struct(">16sQ8sI")  # magic, seq, record magic, CRC-32 of the rest
RECORD_HEADER = struct.Struct(">8sBBHQI")  # magic, type, qid length, 0, payload length, CRC
_CRC_SPAN = RECORD_HEADER.size - 4  # the header bytes the CRC covers (all but itself)
_LENGTH = struct.Struct(">I")
COMMIT, UPDATE, REMOVE = 1, 2, 3
KINDS = frozenset({COMMIT, UPDATE, REMOVE})
MAX_QID = 32  # ids.py accepts up to 32 characters
MAX_ENVELOPE = 64 * 1024 * 1024  # a length beyond this is damage, not an envelope
BLOCK = 1024 * 1024  # bounded reads of a large message

INCOMPLETE = "incomplete"  # runs past the end of the data: a torn append, or a bad length
BAD = "bad"  # not a record here


def segment_name(seq: int) -> str:
    return f"{seq:016d}.log"


def seq_of(name: str) -> int | None:
    """The sequence number a segment file name carries, or None for any other name."""
    stem, dot, ext = name.partition(".")
    if dot and ext == "log" and len(stem) == 16 and stem.isdigit():
        return int(stem)
    return None


def segment_header(seq: int, magic: bytes) -> bytes:
    head = SEGMENT_HEADER.pack(SEGMENT_MAGIC, seq, magic, 0)
    crc = zlib.crc32(head[: SEGMENT_HEADER.size - 4])
    return head[: SEGMENT_HEADER.size - 4] + struct.pack(">I", crc)


def read_segment_header(read: Read, seq: int) -> bytes | None:
    """The record magic of a whole, matching segment header, or None."""
    head = read(SEGMENT_HEADER.size, 0)
    if len(head) < SEGMENT_HEADER.size:
        return None
    smagic, hseq, magic, crc = SEGMENT_HEADER.unpack(head)
    if smagic != SEGMENT_MAGIC or hseq != seq:
        return None
    if zlib.crc32(head[: SEGMENT_HEADER.size - 4]) != crc:
        return None
    return bytes(magic)


def crc_of(read: Read, offset: int, length: int, crc: int) -> int | None:
    """CRC-32 (continuing `crc`) of `length` bytes from `offset`, read in bounded blocks;
    None when the source is shorter."""
    done = 0
    while done < length:  # bounded: every pass reads at least one byte or returns
        block = read(min(BLOCK, length - done), offset + done)
        if not block:
            return None
        crc = zlib.crc32(block, crc)
        done += len(block)
    return crc


@dataclass(frozen=True, slots=True)
class Tail:
    """Bytes that end a COMMIT's message without passing through memory: `length` bytes of
    `read` from `offset` (a spilled message, or a message copied forward)."""

    read: Read
    offset: int
    length: int


def encode(
    magic: bytes,
    kind: int,
    qid: str,
    envelope: bytes = b"",
    message: Sequence[bytes | bytearray] = (),
    tail: Tail | None = None,
) -> list[bytes | bytearray]:
    """A record's bytes, except the tail's: COMMIT with envelope and message parts (and the
    tail's bytes after them, which the writer appends itself), UPDATE with envelope, REMOVE.
    OSError(EIO) when the tail is shorter than it says."""
    qid_bytes = qid.encode("ascii")
    payload: list[bytes | bytearray] = []
    if kind == COMMIT:
        payload = [_LENGTH.pack(len(envelope)), envelope, *message]
    elif kind == UPDATE:
        payload = [envelope]
    length = sum(len(p) for p in payload) + (tail.length if tail else 0)
    head = RECORD_HEADER.pack(magic, kind, len(qid_bytes), 0, length, 0)
    crc = zlib.crc32(qid_bytes, zlib.crc32(head[:_CRC_SPAN]))
    for part in payload:
        crc = zlib.crc32(part, crc)
    if tail is not None:
        tail_crc = crc_of(tail.read, tail.offset, tail.length, crc)
        if tail_crc is None:
            raise OSError(errno.EIO, "source shorter than its recorded length")
        crc = tail_crc
    return [head[:_CRC_SPAN] + struct.pack(">I", crc), qid_bytes, *payload]


def message_offset(start: int, qid: str, envelope: bytes) -> int:
    """Where the message bytes of a COMMIT record written at `start` begin."""
    return start + RECORD_HEADER.size + len(qid) + _LENGTH.size + len(envelope)


@dataclass(frozen=True, slots=True)
class Record:
    """One whole record read back, with a matching CRC."""

    kind: int
    qid: str
    start: int
    end: int
    envelope: bytes  # JSON for COMMIT and UPDATE, b"" for REMOVE
    msg_offset: int = 0
    msg_length: int = 0


def read_record(read: Read, magic: bytes, pos: int, size: int) -> Record | str:
    """The record at `pos` of data `size` bytes long: a Record, INCOMPLETE or BAD."""
    head = read(RECORD_HEADER.size + MAX_QID, pos)
    if len(head) < RECORD_HEADER.size:
        return INCOMPLETE
    rmagic, kind, qlen, zero, plen, crc = RECORD_HEADER.unpack_from(head)
    if rmagic != magic or kind not in KINDS or zero or not 0 < qlen <= MAX_QID:
        return BAD
    body = pos + RECORD_HEADER.size + qlen
    end = body + plen
    if end > size:
        return INCOMPLETE
    qid_bytes = head[RECORD_HEADER.size : RECORD_HEADER.size + qlen]
    qid = qid_bytes.decode("ascii", "replace")
    if len(qid_bytes) != qlen or not is_queue_id(qid):
        return BAD
    check = zlib.crc32(qid_bytes, zlib.crc32(head[:_CRC_SPAN]))
    envelope = b""
    msg_offset = msg_length = 0
    if kind == REMOVE:
        if plen:
            return BAD
    elif kind == UPDATE:
        if plen > MAX_ENVELOPE:
            return BAD
        envelope = read(plen, body)
        if len(envelope) != plen:
            return INCOMPLETE
        check = zlib.crc32(envelope, check)
    else:
        first = read(min(plen, BLOCK), body)
        if len(first) < _LENGTH.size:
            return BAD if plen < _LENGTH.size else INCOMPLETE
        (env_length,) = _LENGTH.unpack_from(first)
        if env_length > min(plen - _LENGTH.size, MAX_ENVELOPE):
            return BAD
        msg_offset = body + _LENGTH.size + env_length
        msg_length = end - msg_offset
        if len(first) == plen:  # the usual, small record: one read
            envelope = first[_LENGTH.size : _LENGTH.size + env_length]
            check = zlib.crc32(first, check)
        else:
            envelope = read(env_length, body + _LENGTH.size)
            if len(envelope) != env_length:
                return INCOMPLETE
            check = zlib.crc32(envelope, zlib.crc32(first[: _LENGTH.size], check))
            rest = crc_of(read, msg_offset, msg_length, check)
            if rest is None:
                return INCOMPLETE
            check = rest
    if check != crc:
        return BAD
    return Record(kind, qid, pos, end, envelope, msg_offset, msg_length)


def resync(read: Read, magic: bytes, pos: int, size: int) -> int | None:
    """The offset of the next whole record at or after `pos`, or None (a torn tail)."""
    offset = pos
    while offset < size:  # bounded: advances by BLOCK
        block = read(BLOCK + len(magic) - 1, offset)
        if not block:
            return None
        hit = block.find(magic)
        while hit >= 0:  # bounded: find() moves forward within the block
            if isinstance(read_record(read, magic, offset + hit, size), Record):
                return offset + hit
            hit = block.find(magic, hit + 1)
        offset += BLOCK
    return None


@dataclass(slots=True)
class Scan:
    """What reading a run of records found."""

    records: list[Record] = field(default_factory=list)
    end: int = 0  # after the last whole record
    bad: list[tuple[int, int]] = field(default_factory=list)  # skipped (start, end) regions
    torn_at: int | None = None  # where an incomplete tail starts


def scan(read: Read, magic: bytes, start: int, size: int) -> Scan:
    """Every whole record from `start` to `size`: damage in between is skipped (and named in
    `bad`), an unfinished record at the end is named in `torn_at`."""
    found = Scan(end=start)
    pos = start
    while pos < size:  # bounded: pos strictly increases
        record = read_record(read, magic, pos, size)
        if isinstance(record, Record):
            found.records.append(record)
            pos = found.end = record.end
            continue
        resume = resync(read, magic, pos + 1, size)
        if resume is None:
            found.torn_at = pos
            break
        found.bad.append((pos, resume))
        pos = resume
    return found


def torn_qid(read: Read, magic: bytes, pos: int) -> str:
    """The queue id of the COMMIT whose append was torn at `pos`, when enough of it is there."""
    head = read(RECORD_HEADER.size + MAX_QID, pos)
    if len(head) < RECORD_HEADER.size or head[:8] != magic:
        return ""
    qlen = head[9]
    if len(head) < RECORD_HEADER.size + qlen:
        return ""  # cut inside the qid: not worth guessing
    qid = head[RECORD_HEADER.size : RECORD_HEADER.size + qlen].decode("ascii", "replace")
    return qid if head[8] == COMMIT and is_queue_id(qid) else ""

"""The journal's picture in memory: which segments exist and where each entry lives.

Owns: `Segment` (one log file and what this process knows of it), `Entry` (where a queued
message's bytes are, and its envelope), `Index` (both tables, and applying a record read back
to them), `Out` (one record to append). Must not: read or write files beyond closing the
descriptors of segments nothing lives in any more; journal.py guards an Index with its mutex.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mailgate.spool.disk import close_quietly
from mailgate.spool.entry import Envelope
from mailgate.spool.record import COMMIT, UPDATE, Record


@dataclass(slots=True)
class Segment:
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

    def close(self) -> None:
        close_quietly(self.fd)
        close_quietly(self.wfd)
        self.fd = self.wfd = None

    def close_writer(self) -> None:
        close_quietly(self.wfd)
        self.wfd = None


@dataclass(slots=True)
class Entry:
    segment: int  # where the current COMMIT (and so the message bytes) is
    offset: int  # of the message bytes
    length: int
    weight: int  # bytes of the COMMIT record
    raw: bytes  # the envelope JSON as stored
    envelope: Envelope | None = None  # parsed on first use


@dataclass(slots=True)
class Out:
    """One record to append: `parts` in memory, then `length` bytes of `source` (a spilled
    message or a message copied forward) from `offset`, copied in the kernel."""

    parts: list[bytes | bytearray]
    source: int | None = None
    offset: int = 0
    length: int = 0

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.parts) + self.length


@dataclass(slots=True)
class Findings:
    """What reading the journal at recovery found (for RecoveryReport and the log)."""

    orphans: list[str] = field(default_factory=list)
    damaged: set[int] = field(default_factory=set)  # segments with a skipped region


class Index:
    """Segments by sequence number and entries by queue id. Not thread-safe by itself."""

    def __init__(self) -> None:
        self.segments: dict[int, Segment] = {}
        self.entries: dict[str, Entry] = {}

    def head(self) -> Segment | None:
        return self.segments[max(self.segments)] if self.segments else None

    def oldest(self) -> Segment:
        return self.segments[min(self.segments)]

    def clear(self) -> None:
        for seg in self.segments.values():
            seg.close()
        self.segments.clear()
        self.entries.clear()

    def forget_segment(self, seg: Segment) -> None:
        seg.close()
        del self.segments[seg.seq]

    def close_idle(self) -> None:
        """Close the read descriptors of segments (not the head) where nothing lives."""
        head = self.head()
        for seg in self.segments.values():
            if seg.live == 0 and seg is not head:
                close_quietly(seg.fd)  # nothing will be read from it again
                seg.fd = None

    def add(self, qid: str, seg: Segment, entry: Entry) -> None:
        """`entry` (a COMMIT in `seg`) is now where `qid` lives."""
        old = self.entries.get(qid)
        if old is not None:
            self.unlive(old)
        self.entries[qid] = entry
        seg.live += 1
        seg.live_bytes += entry.weight

    def drop(self, qid: str) -> None:
        self.unlive(self.entries.pop(qid))

    def apply(self, seg: Segment, record: Record) -> None:
        """A record read back from `seg`: the last record of a qid wins."""
        old = self.entries.get(record.qid)
        if record.kind == COMMIT:
            weight = record.end - record.start
            entry = Entry(seg.seq, record.msg_offset, record.msg_length, weight, record.envelope)
            self.add(record.qid, seg, entry)
        elif record.kind == UPDATE:
            if old is not None:  # else: removed later in a segment compacted away; harmless
                old.raw, old.envelope = record.envelope, None
        elif old is not None:
            self.drop(record.qid)

    def unlive(self, entry: Entry) -> None:
        seg = self.segments.get(entry.segment)
        if seg is None:
            return
        seg.live -= 1
        seg.live_bytes -= entry.weight
        if seg.live == 0 and seg is not self.head():
            close_quietly(seg.fd)  # nothing will be read from it again
            seg.fd = None

    def where(self, seq: int) -> list[tuple[str, Entry]]:
        """The entries whose current COMMIT is in segment `seq`."""
        return [(q, e) for q, e in self.entries.items() if e.segment == seq]

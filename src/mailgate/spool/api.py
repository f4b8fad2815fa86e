"""The spool interface every stage is typed against: `SpoolStore`.

Owns: the `SpoolStore` protocol (what receiving, accept, delivery, the breaker and
`mailgate queue` may ask of the spool), `NotFound`, `RecoveryReport` and the header-section
cut and envelope check shared by every reader. Must not: touch files; the one implementation is
`spool.journal.JournalStore`, built by `spool.open_store()`.

Durability contract (RFC 5321 §6.1: once "250" is sent, the message must not be lost), which
every implementation keeps: `commit()`/`commit_batch()` return only when the message bytes and
the envelope are durable; `update()` returns only when the change is durable; recovery keeps
every whole record, cuts a torn tail and never brings back a removed entry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mailgate.errors import SpoolError
from mailgate.spool.entry import Envelope
from mailgate.spool.ids import is_queue_id
from mailgate.spool.incoming import Incoming

HEADER_LIMIT = 256 * 1024  # read_headers() reads at most this much of a message
READ_CHUNK = 256 * 1024  # what read_chunks() yields at a time
# What Envelope.from_json raises on malformed JSON or a JSON value of the wrong shape.
_PARSE_ERRORS = (ValueError, KeyError, TypeError, AttributeError)


class NotFound(SpoolError):
    """No committed entry has this queue id."""


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What `recover()` found and did at startup.

    entries:           committed entries that load (what the engine will work on).
    tmp_removed:       files removed from tmp/ (messages being received when we stopped).
    orphans_removed:   queue ids of interrupted, never acknowledged commits that were cut away.
    moved_to_corrupt:  queue ids written out to corrupt/ (their envelope did not parse).
    """

    entries: int = 0
    tmp_removed: int = 0
    orphans_removed: tuple[str, ...] = ()
    moved_to_corrupt: tuple[str, ...] = ()

    def __str__(self) -> str:
        """key=value, for the startup log line."""
        corrupt = ",".join(self.moved_to_corrupt) or "-"
        return (
            f"entries={self.entries} tmp_removed={self.tmp_removed}"
            f" orphans_removed={len(self.orphans_removed)} moved_to_corrupt={corrupt}"
        )


def checked_qid(qid: str) -> str:
    """`qid`, or NotFound when it cannot be a queue id: ids come from the command line too,
    and must never name anything outside the spool."""
    if not is_queue_id(qid):
        raise NotFound(f"no such queue entry: {qid}")
    return qid


def parse_envelope(qid: str, raw: bytes) -> Envelope:
    """The stored envelope of `qid`; SpoolError when it does not parse or names another id."""
    try:
        envelope = Envelope.from_json(raw)
    except _PARSE_ERRORS as e:
        raise SpoolError(f"qid={qid}: unreadable envelope ({type(e).__name__})") from None
    if envelope.id != qid:
        raise SpoolError(f"qid={qid}: envelope names id {envelope.id!r}")
    return envelope


def header_section(head: bytes) -> bytes:
    """The header section of a message's first bytes: up to and excluding the empty line."""
    if head.startswith(b"\r\n"):
        return b""
    end = head.find(b"\r\n\r\n")
    return head if end < 0 else head[: end + 2]


class SpoolStore(Protocol):
    """The durable spool. Safe to use from several threads and several processes."""

    path: Path

    # -- receiving ------------------------------------------------------------------------

    def begin(self, qid: str | None = None) -> Incoming:
        """Start receiving a message; its queue id is known from here on (for Received)."""
        ...

    def prepare_commit(self, incoming: Incoming, envelope: Envelope) -> None:
        """Check a commit's arguments and claim `incoming` for it, in the caller's thread.
        UsageError for a foreign envelope id or an incoming already committed/aborted."""
        ...

    def commit(self, incoming: Incoming, envelope: Envelope, prefix: bytes = b"") -> Envelope:
        """Store prefix + the received bytes and the envelope durably; the stored envelope."""
        ...

    def commit_batch(
        self, items: Sequence[tuple[Incoming, Envelope, bytes]]
    ) -> list[Envelope | Exception]:
        """Commit several entries at once; one result (envelope or error) per item, in order."""
        ...

    def enqueue(self, envelope: Envelope, message: bytes) -> Envelope:
        """Spool a message we generated (a bounce)."""
        ...

    # -- reading --------------------------------------------------------------------------

    def ids(self) -> list[str]:
        """Queue ids of committed entries, oldest first."""
        ...

    def load(self, qid: str) -> Envelope:
        """The committed envelope; NotFound, or SpoolError if it does not parse."""
        ...

    def read_message(self, qid: str) -> bytes:
        """The message bytes as they will be sent; NotFound."""
        ...

    def read_headers(self, qid: str, limit: int = HEADER_LIMIT) -> bytes:
        """The header section, at most `limit` bytes, without reading a large body."""
        ...

    def read_chunks(self, qid: str, size: int = READ_CHUNK) -> Iterator[bytes]:
        """The message bytes in chunks of `size` (a large message is never read whole);
        NotFound at the first next(). Reads the disk: run it in a thread from an event loop."""
        ...

    # -- changing -------------------------------------------------------------------------

    def update(self, qid: str, change: Callable[[Envelope], Envelope]) -> Envelope:
        """Apply `change` to the stored envelope and store the result durably."""
        ...

    def remove(self, qid: str) -> None:
        """Delete an entry (the engine's own removals: no poke)."""
        ...

    def change_batch(
        self, changes: Sequence[tuple[str, Callable[[Envelope], Envelope] | None]]
    ) -> list[Envelope | Exception | None]:
        """Several updates (a change) and removals (None) in order, as one write (and one
        fdatasync when an update is among them): per item the new envelope, None for a
        removal, or that item's own error."""
        ...

    def hold(self, qid: str) -> Envelope:
        """The engine skips held entries until `release()`; pokes the engine."""
        ...

    def release(self, qid: str) -> Envelope: ...

    def delete(self, qid: str) -> None:
        """`remove()` plus a poke, for the operator."""
        ...

    def flush(self, qid: str | None = None) -> int:
        """Make pending recipients due now (one entry, or all); how many entries changed."""
        ...

    # -- waking a running engine, startup, shutdown ----------------------------------------

    def poke(self) -> None:
        """Tell a running engine (maybe in another process) to rescan."""
        ...

    def wakeup_mtime(self) -> float:
        """Changes whenever someone pokes."""
        ...

    def recover(self) -> RecoveryReport:
        """Repair what an interrupted run left behind (before serving)."""
        ...

    def close(self) -> None:
        """Release descriptors; the object is unusable afterwards."""
        ...

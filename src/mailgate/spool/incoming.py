"""A message being received: the DATA of one transaction before it is committed.

Owns: spool/tmp/<qid>.data (a message that outgrew memory) and the states of a message on its
way into the spool. Must not: commit (the store does, through the public hand-over methods at
the end of the class), parse or change message bytes beyond what its caller asks.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Literal

from mailgate.errors import SpoolError, UsageError
from mailgate.spool.disk import FILE_MODE, spool_error, unlink_quietly, write_all

MEMORY_LIMIT = 256 * 1024  # an Incoming keeps up to this much in memory, then spills to tmp/
READ_CHUNK = 256 * 1024  # what chunks() yields at a time


class Incoming:
    """A message being received: kept in memory up to MEMORY_LIMIT, then spilled to spool/tmp/.

    Made by the store's `begin()`; consumed by its `commit()` or discarded by `abort()`. After
    a write error the object is failed: later writes and the commit raise the same error again,
    so a session may keep reading DATA to its end and answer once.

    States: open (write, read, abort) -> claimed (handed to a commit, possibly in another
    thread: abort() is now a no-op, so a session's cleanup cannot pull files from under it)
    -> done (committed or aborted).

    The message is `head` followed by the received bytes from offset `cut` on (both empty and
    0 until `replace_head()`): the accept stage changes the header section (a missing empty
    line, a Sender: field it drops) without reading or copying the body, and the commit
    writes head and body as they stand. `size` counts the received bytes; `length` is the
    message's.
    """

    def __init__(self, qid: str, tmp_dir: Path, owner: tuple[int, int] | None) -> None:
        self.qid = qid
        self.size = 0
        self._tmp_dir = tmp_dir
        self._owner = owner
        self._buffer: bytearray | None = bytearray()
        self._fd: int | None = None
        self._error: SpoolError | None = None
        self._state: Literal["open", "claimed", "done"] = "open"
        self.head = b""
        self.cut = 0

    @property
    def spill_path(self) -> Path:
        return self._tmp_dir / f"{self.qid}.data"

    @property
    def is_spilled(self) -> bool:
        return self._buffer is None

    @property
    def is_open(self) -> bool:
        """Neither handed to a commit nor aborted: it may be written and read."""
        return self._state == "open"

    def write(self, data: bytes) -> None:
        """Append message bytes; may raise SpoolFull or SpoolError."""
        self._check_usable()
        if not data:
            return
        try:
            if self._buffer is not None and len(self._buffer) + len(data) <= MEMORY_LIMIT:
                self._buffer += data
            else:
                if self._buffer is not None:
                    self._spill()
                assert self._fd is not None
                write_all(self._fd, data)
        except OSError as e:
            error = spool_error(e, f"qid={self.qid} writing message")
            self._fail(error)
            raise error from None
        self.size += len(data)

    def replace(self, data: bytes) -> None:
        """Replace the whole message so far; may raise SpoolFull or SpoolError."""
        self._check_usable()
        self.release()
        self.size = 0
        self.head, self.cut = b"", 0
        self.write(data)

    def replace_head(self, head: bytes, cut: int) -> None:
        """The message becomes `head` followed by the received bytes from offset `cut` on
        (accept.py's new header section in front of the unchanged body; nothing is copied)."""
        self._check_usable()
        if not 0 <= cut <= self.size:
            raise UsageError(f"qid={self.qid}: cut {cut} outside the message ({self.size})")
        self.head, self.cut = head, cut

    @property
    def length(self) -> int:
        """The message's length: the head and the received bytes after the cut."""
        return len(self.head) + self.size - self.cut

    def file_span(self) -> tuple[str, bytes, int] | None:
        """(path, head, offset): the message is `head` followed by the spilled file from
        `offset` on, for a reader in another process (the MIME walk of a large message);
        None while it is held in memory."""
        self._check_usable()
        return (str(self.spill_path), self.head, self.cut) if self.is_spilled else None

    def chunks(self, start: int = 0, size: int = READ_CHUNK) -> Iterator[bytes]:
        """The message from offset `start` on, `size` bytes at a time (the head may come in
        one piece). Reads a spilled file: call it from a worker thread for a large message."""
        self._check_usable()
        if start < len(self.head):
            yield self.head[start:]
            start = len(self.head)
        pos = self.cut + start - len(self.head)
        if self._buffer is not None:
            buffer = self._buffer
            for offset in range(pos, len(buffer), size):
                yield bytes(buffer[offset : offset + size])
            return
        try:
            with open(self.spill_path, "rb") as f:
                f.seek(pos)
                for _ in range((self.size - pos) // size + 1):  # bounded by the file's size
                    chunk = f.read(size)
                    if not chunk:
                        return
                    yield chunk
        except OSError as e:
            raise spool_error(e, f"qid={self.qid} reading message") from None

    def getvalue(self) -> bytes:
        """The whole message so far (reads back a spilled file): for small messages and tests."""
        return b"".join(self.chunks())

    def open_reader(self) -> BinaryIO:
        """A binary stream over the message so far, without holding it in memory."""
        self._check_usable()
        if self._buffer is not None or self.head:
            return io.BufferedReader(_ChunkStream(self.chunks()), READ_CHUNK)
        try:
            return open(self.spill_path, "rb")
        except OSError as e:
            raise spool_error(e, f"qid={self.qid} reading message") from None

    def abort(self) -> None:
        """Discard the message. Idempotent, and a no-op once handed to a commit."""
        if self._state == "open":
            self.release()
            self._state = "done"

    def __enter__(self) -> Incoming:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()

    # -- the hand-over to the store's commit ---------------------------------------------

    def claim(self) -> None:
        """Hand over to a commit; from here on only the store touches the files. UsageError
        if it was handed over or aborted before."""
        if self._state != "open":
            raise UsageError(f"qid={self.qid}: incoming message already committed or aborted")
        self._state = "claimed"

    @property
    def is_claimed(self) -> bool:
        return self._state == "claimed"

    def take(self) -> None:
        """The commit starts: whatever happens next, it cannot be committed twice."""
        if self._state != "claimed":
            raise UsageError(f"qid={self.qid}: incoming message not claimed for a commit")
        self._state = "done"

    @property
    def failure(self) -> SpoolError | None:
        """The error that failed a write, which the commit must answer instead."""
        return self._error

    def in_memory(self) -> bytearray | None:
        """The message, when it is held in memory (None: it is in `spill_path`)."""
        return self._buffer

    def finish_spill(self) -> None:
        """Close the spill file's write descriptor; the file stays for the store to read."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def release(self) -> None:
        """Free what the message holds: the write descriptor, the spill file, the memory."""
        self.finish_spill()
        if self._buffer is None:
            unlink_quietly(self.spill_path)
        self._buffer = bytearray()
        self.head = b""

    # -- private ---------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._state != "open":
            raise UsageError(f"qid={self.qid}: incoming message already committed or aborted")
        if self._error is not None:
            raise self._error

    def _spill(self) -> None:
        buffer = self._buffer
        assert buffer is not None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self._fd = os.open(self.spill_path, flags, FILE_MODE)
        self._buffer = None  # from here on the file exists, and release() must remove it
        if self._owner is not None:
            os.fchown(self._fd, *self._owner)
        write_all(self._fd, buffer)

    def _fail(self, error: SpoolError) -> None:
        # Free the disk space now: a full disk is shared by every session.
        self.release()
        self._error = error


class _ChunkStream(io.RawIOBase):
    """A readable raw stream over an iterator of chunks (for `Incoming.open_reader`)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]  # typeshed: Buffer
        if not self._pending:
            self._pending = next(self._chunks, b"")
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

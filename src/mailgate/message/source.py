"""A message that is read in chunks, wherever it is kept.

Owns: `MessageSource`, what the readers of the accept stage take (the MIME walk, clamd's
INSTREAM, DKIM's body hash), and `BytesSource` for a message held in memory (tests, tools).
The received message is `spool.incoming.Incoming`, which reads its spilled file; it has
this shape without importing it (spool imports nothing of message). Must not: do I/O here.

Why: a message may be 50 MB. Each reader takes it a chunk at a time, so what a session holds
is one chunk per reader and the header section, never the message (issue #18).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

CHUNK = 256 * 1024


class MessageSource(Protocol):
    @property
    def length(self) -> int:
        """The message's length in bytes."""
        ...

    def chunks(self, start: int = 0, size: int = CHUNK) -> Iterator[bytes]:
        """The message from offset `start` on, about `size` bytes at a time. May read a
        file: a caller on the event loop runs it in a thread for a large message."""
        ...


@runtime_checkable
class FileBacked(Protocol):
    """A MessageSource that may be read by another process (scan/walker.py) by its path."""

    def file_span(self) -> tuple[str, bytes, int] | None:
        """(path, head, offset): the message is `head` followed by the file at `path` from
        `offset` on; None when it is not in a file (held in memory)."""
        ...


class BytesSource:
    """A message held in memory."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    def length(self) -> int:
        return len(self.data)

    def chunks(self, start: int = 0, size: int = CHUNK) -> Iterator[bytes]:
        view = memoryview(self.data)
        for offset in range(start, len(view), size):
            yield bytes(view[offset : offset + size])


def as_source(message: bytes | MessageSource) -> MessageSource:
    return BytesSource(message) if isinstance(message, bytes | bytearray) else message

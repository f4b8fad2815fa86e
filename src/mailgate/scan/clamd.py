"""A small asyncio client for clamd: PING, VERSION and INSTREAM over TCP or a Unix socket.

Owns: the clamd wire protocol (clamd(8), "COMMANDS": NUL-terminated ``z`` commands; INSTREAM
chunks each prefixed by a 4-byte big-endian length, ended by a zero-length chunk), its
timeouts, and the mapping of every failure to ``ScannerUnavailable``. Must not: decide what a
verdict means for the message (that is `mailgate.scan`), or ever report "clean" for a reply it
does not understand.

Why our own client: the project's dependencies include no clamd client, the three commands
we use are simple, and what we need is specific: TCP and Unix sockets, separate connect and
exchange timeouts, chunked sending from a memoryview with backpressure, clamd's early
refusals read while sending, and every unknown reply treated as "no verdict". A small module
tested against a real clamd does that without a new dependency. The closest maintained
library we know of is aioclamd (async, INSTREAM); it could replace this module if the
project prefers a dependency, provided it meets the points above.

Streaming: the message is sent from a ``memoryview`` in slices of ``chunk_size`` bytes, or
from an async iterator of chunks read from the spool, so no chunk copies the whole message,
and each slice waits for ``drain()`` so that a slow clamd pushes back instead of letting a
50 MB message pile up in the transport's buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

from mailgate.errors import ScannerUnavailable

DEFAULT_CHUNK_SIZE = 256 * 1024
_MAX_REPLY = 4096  # clamd's replies are one short line; anything longer is not clamd


@dataclass(frozen=True, slots=True)
class ClamdAddress:
    """Where clamd listens: a TCP host and port, or a Unix socket path (then host is "")."""

    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, spec: str) -> ClamdAddress:
        """``tcp:HOST:PORT`` (HOST may be ``[v6]``) or ``unix:/path``, as in scanner.clamd."""
        if spec.startswith("unix:") and len(spec) > len("unix:"):
            return cls(host="", port=0, path=spec.removeprefix("unix:"))
        if spec.startswith("tcp:"):
            host, sep, port = spec.removeprefix("tcp:").rpartition(":")
            if sep and host and port.isdigit() and 0 < int(port) < 65536:
                return cls(host=host.removeprefix("[").removesuffix("]"), port=int(port), path="")
        raise ValueError(f"not a clamd address: {spec!r}")

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        return (
            f"tcp:[{self.host}]:{self.port}" if ":" in self.host else f"tcp:{self.host}:{self.port}"
        )


@dataclass(frozen=True, slots=True)
class ScanResult:
    """clamd's answer to INSTREAM. virus: the signature name when found, else None."""

    virus: str | None


class ClamdClient:
    """One connection per command; every method raises ScannerUnavailable on any failure.

    connect_timeout bounds the connection; timeout bounds the whole exchange after it
    (sending the stream and waiting for the verdict).
    """

    def __init__(
        self,
        address: ClamdAddress,
        *,
        timeout: float,
        connect_timeout: float,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.address = address
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.chunk_size = chunk_size

    async def ping(self) -> None:
        """Raise ScannerUnavailable unless clamd answers PONG."""
        reply = await self._command(b"zPING\0", b"")
        if reply != "PONG":
            raise ScannerUnavailable(f"clamd at {self.address}: unexpected PING reply {reply!r}")

    async def version(self) -> str:
        """clamd's VERSION line: "ClamAV 1.4.6/27500/Sat Nov 28 08:14:02 2026"."""
        reply = await self._command(b"zVERSION\0", b"")
        if not reply.startswith("ClamAV "):
            raise ScannerUnavailable(f"clamd at {self.address}: unexpected VERSION {reply!r}")
        return reply

    async def instream(
        self, data: bytes | bytearray | memoryview | AsyncIterator[bytes], length: int = -1
    ) -> ScanResult:
        """Scan `data` (bytes, or chunks of `length` bytes in all) as one stream. Its size
        must not exceed clamd's StreamMaxLength."""
        reply = await self._command(b"zINSTREAM\0", data, length)
        return _parse_instream_reply(reply, self.address)

    async def _command(
        self,
        command: bytes,
        stream: bytes | bytearray | memoryview | AsyncIterator[bytes],
        length: int = -1,
    ) -> str:
        """Send one command (and, for INSTREAM, the stream); return the reply without NUL.

        The reply is awaited while the stream is still being sent: clamd answers early and
        closes when it refuses a stream (size limit exceeded), and that answer is a better
        diagnostic than the EPIPE of the next write.
        """
        reader, writer = await self._connect()
        reply = asyncio.create_task(_read_reply(reader, self.address))
        if isinstance(stream, bytes | bytearray | memoryview):
            view = memoryview(stream).cast("B") if stream else memoryview(b"")
            length = len(view)
        sent = 0
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    writer.write(command)
                    if command == b"zINSTREAM\0":
                        if isinstance(stream, bytes | bytearray | memoryview):
                            sent = await self._send_stream(writer, view, reply)
                        else:
                            sent = await self._send_chunks(writer, stream, reply)
                    await writer.drain()
                except OSError as e:
                    early = await _early_reply(reply)
                    if early:
                        return early
                    raise ScannerUnavailable(
                        f"clamd at {self.address}: connection lost after {sent} of {length}"
                        f" stream bytes: {e} (does clamd's StreamMaxLength equal"
                        " scanner.max_stream_size?)"
                    ) from None
                return await reply
        except TimeoutError:
            raise ScannerUnavailable(
                f"clamd at {self.address}: no reply within {self.timeout:g} s"
            ) from None
        finally:
            if reply.done():
                if not reply.cancelled():
                    reply.exception()  # retrieved: the outcome was already handled above
            else:
                reply.cancel()
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def _send_stream(
        self, writer: asyncio.StreamWriter, view: memoryview, reply: asyncio.Task[str]
    ) -> int:
        """Send `view` as INSTREAM chunks; stop early if clamd has already answered.

        Returns the number of stream bytes sent.
        """
        if len(view) <= self.chunk_size:
            # One write, one syscall: a small message costs clamd's scan, not our sends.
            # (The copy is at most one chunk.)
            chunk = struct.pack("!I", len(view)) + view if view else b""
            writer.write(chunk + b"\0\0\0\0")
            return len(view)
        return await self._send_chunks(writer, _once(view), reply)

    async def _send_chunks(
        self,
        writer: asyncio.StreamWriter,
        chunks: AsyncIterator[bytes | memoryview],
        reply: asyncio.Task[str],
    ) -> int:
        """`_send_stream` for chunks that arrive one at a time (read from the spool)."""
        sent = 0
        async for chunk in chunks:
            view = memoryview(chunk)
            for start in range(0, len(view), self.chunk_size):
                if reply.done():
                    return sent
                piece = view[start : start + self.chunk_size]
                writer.write(struct.pack("!I", len(piece)))
                writer.write(piece)
                await writer.drain()
                sent += len(piece)
        writer.write(b"\0\0\0\0")  # the zero-length chunk ends the stream
        return sent

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.address.path:
                    return await asyncio.open_unix_connection(self.address.path, limit=_MAX_REPLY)
                return await asyncio.open_connection(
                    self.address.host, self.address.port, limit=_MAX_REPLY
                )
        except TimeoutError:
            raise ScannerUnavailable(
                f"clamd at {self.address}: connect timed out after {self.connect_timeout:g} s"
            ) from None
        except OSError as e:
            raise ScannerUnavailable(f"clamd at {self.address}: cannot connect: {e}") from None


async def _read_reply(reader: asyncio.StreamReader, address: ClamdAddress) -> str:
    try:
        raw = await reader.readuntil(b"\0")
    except asyncio.IncompleteReadError as e:
        raise ScannerUnavailable(
            f"clamd at {address}: connection closed before a reply"
            + (f" (partial {e.partial[:100]!r})" if e.partial else "")
        ) from None
    except asyncio.LimitOverrunError:
        raise ScannerUnavailable(f"clamd at {address}: reply longer than {_MAX_REPLY}") from None
    except OSError as e:
        raise ScannerUnavailable(f"clamd at {address}: reading reply: {e}") from None
    return raw[:-1].decode("utf-8", "replace").strip()


async def _early_reply(reply: asyncio.Task[str]) -> str:
    """What clamd said before the connection broke, if it said anything (waits at most 1 s)."""
    try:
        async with asyncio.timeout(1.0):
            return await asyncio.shield(reply)
    except (ScannerUnavailable, TimeoutError):
        return ""


def _parse_instream_reply(reply: str, address: ClamdAddress) -> ScanResult:
    """``stream: OK``, ``stream: NAME FOUND``; anything else means we do not know: unavailable.

    clamd reports its own failures as ``... ERROR`` (for example ``INSTREAM size limit
    exceeded. ERROR`` when the stream is longer than its StreamMaxLength).
    """
    if reply == "stream: OK":
        return ScanResult(virus=None)
    if reply.startswith("stream: ") and reply.endswith(" FOUND"):
        name = reply.removeprefix("stream: ").removesuffix(" FOUND").strip()
        if name:
            return ScanResult(virus=name)
    if "size limit exceeded" in reply:
        raise ScannerUnavailable(
            f"clamd at {address}: {reply!r}: its StreamMaxLength is lower than"
            " scanner.max_stream_size; make them equal"
        )
    raise ScannerUnavailable(f"clamd at {address}: unexpected INSTREAM reply {reply!r}")


async def _once(view: memoryview) -> AsyncIterator[memoryview]:
    """`view` as a stream of one chunk (`_send_chunks` cuts it to clamd's chunk size)."""
    yield view

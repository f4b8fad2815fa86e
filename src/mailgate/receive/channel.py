"""A byte channel between the event loop and one session coroutine.

Owns: the asyncio Protocol of every accepted connection: buffering received bytes, flow
control both ways, read deadlines, and the STARTTLS upgrade. Must not: interpret SMTP.

Why not asyncio streams: `StreamWriter.start_tls()` keeps whatever plaintext the StreamReader had
already buffered and hands it to the reader after the handshake, which is exactly the STARTTLS
injection of CVE-2011-0411. Here the session sees every received byte, and `start_tls()` refuses
to upgrade while any unread byte is buffered; `loop.start_tls()` pauses reading synchronously, so
nothing can slip in between the check and the upgrade.

PROXY protocol (receive/proxy.py): on a listener with `proxy_networks`, a connection from a
balancer inside them must start with a PROXY header; the channel reads it before it tells
the listener about the connection, and from then on `get_extra_info("peername")` is the real
client's address, so every user of the address (limits, the smart host's network check,
Received:) sees the client, not the balancer. A header from anybody else is refused.

Why a deadline on read() instead of asyncio.wait_for(): a session reads a dozen times per
message, and each wait_for() wraps the read in a new Task with its own timer. The channel keeps
one timer per connection instead, moved forward lazily: when it fires early (the session made
progress and asked for a later deadline meanwhile) it is set again for the current deadline.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from mailgate.receive import proxy

_HIGH_WATER = 256 * 1024  # pause reading above this many unread bytes
# What the fast path handles for one connection before it lets the loop turn: uvloop reads a
# readable socket up to 32 times per turn, so ten clients sending large messages made one turn
# (and every other session's reply) wait for up to 80 MB of DATA to be unstuffed and spilled.
_TURN_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class ProxyPolicy:
    """PROXY protocol on one listener.

    is_trusted: the TCP peer's address -> True for a balancer (inside proxy_networks), whose
                connections must start with a header.
    refuse:     answers and closes a connection whose header is bad, late, or comes from
                outside proxy_networks; the string says why (for the log).
    timeout:    seconds a balancer's connection may take to send its header.
    """

    is_trusted: Callable[[str], bool]
    refuse: Callable[[Channel, str], None]
    timeout: float = 10.0


class PlaintextAfterStartTls(Exception):
    """Bytes were buffered after STARTTLS: the upgrade is refused."""


class Interrupted(Exception):
    """The server is stopping: a read that was waiting for the client gives up (interrupt())."""


class Channel(asyncio.Protocol):
    """One connection's transport wrapped for a single reading coroutine."""

    def __init__(
        self, on_connect: Callable[[Channel], None], proxy_policy: ProxyPolicy | None = None
    ) -> None:
        self._on_connect = on_connect
        self._proxy = proxy_policy
        self._header: bytes | None = None  # a balancer's bytes until its header is complete
        self._watch_first = False  # refuse a PROXY header in the first bytes (untrusted peer)
        self._peername: tuple[str, int] | None = None  # the client named by the header
        self.transport: asyncio.Transport | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._eof = False
        self._reading_paused = False
        self._turn_bytes = 0  # handled by the fast path since it last let the loop turn
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._closed = asyncio.get_running_loop().create_future()
        self._deadline = 0.0  # loop time after which a waiting read() raises TimeoutError
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        # The session's fast path (session.Session._direct): given the bytes received while a
        # read() waits with nothing buffered; True when it handled them, False to end the read.
        self.direct: Callable[[bytes], bool] | None = None
        self._woken = False  # direct() asked the waiting read() to return

    # --- protocol callbacks --------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        if self._proxy is not None:
            peer = transport.get_extra_info("peername")
            if self._proxy.is_trusted(str(peer[0]) if isinstance(peer, tuple) else ""):
                self._header = b""
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(self._proxy.timeout, self._header_timeout)
                return  # the listener hears of it once the header names the client
            self._watch_first = True
        self._on_connect(self)

    def data_received(self, data: bytes) -> None:
        if self._header is not None:
            rest = self._read_header(data)
            if not rest:
                return
            data = rest
        elif self._watch_first:
            self._watch_first = False
            if proxy.is_header_start(data) and self._proxy is not None:
                self._eof = True
                self._proxy.refuse(self, "PROXY header from a peer outside proxy_networks")
                return
        waiter = self._waiter
        if (
            self.direct is not None
            and waiter is not None
            and not waiter.done()
            and not self._chunks
        ):
            # No Task wake-up per command (issue #19): a session waiting for bytes handles
            # them here. What it cannot finish here it leaves in its machine and wakes read().
            if not self.direct(data):
                self._woken = True
                self._wake()
                return
            self._turn_bytes += len(data)
            if self._turn_bytes >= _TURN_BYTES and not self._reading_paused and self.transport:
                self.transport.pause_reading()
                self._reading_paused = True
                asyncio.get_running_loop().call_soon(self._next_turn)
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER and not self._reading_paused and self.transport:
            self.transport.pause_reading()
            self._reading_paused = True
        self._wake()

    def _next_turn(self) -> None:
        """Read again after the fast path paused for the other connections (unless read() has
        resumed already, or bytes wait in the buffer for it)."""
        self._turn_bytes = 0
        transport = self.transport
        if self._reading_paused and not self._chunks and transport and not transport.is_closing():
            self._reading_paused = False
            transport.resume_reading()

    def _read_header(self, data: bytes) -> bytes:
        """Collect a balancer's PROXY header; the bytes after it once it is complete."""
        assert self._header is not None and self._proxy is not None
        self._header += data
        try:
            header = proxy.parse(self._header)
        except proxy.ProxyError as e:
            self._header = None
            self._proxy.refuse(self, f"bad PROXY header: {e}")
            return b""
        if header is None:
            return b""
        rest = self._header[header.length :]
        self._header = None
        self._stop_timer()
        if header.source is not None:
            self._peername = header.source
        self._on_connect(self)
        return rest

    def _header_timeout(self) -> None:
        self._timer = None
        if self._header is not None and self._proxy is not None:
            self._header = None
            self._proxy.refuse(self, "no PROXY header in time")

    def eof_received(self) -> bool:
        if self._header is not None:
            self._header = None  # a balancer that closed before its header: nothing to serve
            self.close()
            return False
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake()
        self._stop_timer()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # --- session side ------------------------------------------------------------
    @property
    def has_unread(self) -> bool:
        return self._buffered > 0

    @property
    def is_writable(self) -> bool:
        """False while the transport's write buffer is over its high-water mark."""
        return self._writable is None or self._writable.done()

    async def read(self, deadline: float | None = None) -> bytes:
        """Every byte received so far (b"" at end of stream).

        With a `deadline` (loop time), raises TimeoutError once it has passed, even if bytes
        are buffered: bytes that arrive without completing anything do not buy time.
        """
        loop = asyncio.get_running_loop()
        if deadline is not None and loop.time() >= deadline:
            raise TimeoutError
        while not self._chunks and not self._eof and not self._woken:
            self._waiter = loop.create_future()
            if deadline is not None:
                self._arm(loop, deadline)
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._woken = False  # (b"" then: the bytes went to `direct`, not the end of stream)
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait until the peer has taken our output (a client that never reads stalls here)."""
        if self._writable is not None and not self._writable.done():
            await self._writable

    async def start_tls(
        self, context: ssl.SSLContext, handshake_timeout: float, ready: bytes
    ) -> None:
        """Write the `ready` reply (220) and upgrade to TLS as the server (RFC 3207).

        Refuses when plaintext is still buffered. The check, the write and the start of the
        upgrade happen without yielding to the event loop, so the client's handshake cannot be
        mistaken for pipelined plaintext and no plaintext can be read after the check.
        """
        if self.has_unread:
            raise PlaintextAfterStartTls
        assert self.transport is not None
        self.transport.write(ready)
        loop = asyncio.get_running_loop()
        new = await loop.start_tls(
            self.transport, self, context, server_side=True, ssl_handshake_timeout=handshake_timeout
        )
        if new is None:
            raise ConnectionError("TLS upgrade failed")
        self.transport = new

    def interrupt(self) -> None:
        """Make a read that is waiting now raise Interrupted (a read not waiting is unaffected:
        the session checks why it should stop before it reads again)."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(Interrupted())

    def get_extra_info(self, name: str) -> object:
        if name == "peername" and self._peername is not None:
            return self._peername  # the client named by a balancer's PROXY header
        return self.transport.get_extra_info(name) if self.transport is not None else None

    def close(self) -> None:
        self._stop_timer()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self) -> None:
        await self._closed

    def extend_deadline(self, deadline: float) -> None:
        """Move the waiting read()'s deadline (the `direct` callback made progress)."""
        self._deadline = deadline  # the armed timer, if earlier, re-arms itself (_expire)

    def _arm(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        self._deadline = deadline
        if self._timer is not None and self._timer_at <= deadline:
            return  # fires no later than needed; _expire() sets it again if it is early
        self._stop_timer()
        self._timer = loop.call_at(deadline, self._expire)
        self._timer_at = deadline

    def _expire(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # no read is waiting: the next read() checks its deadline itself
        loop = asyncio.get_running_loop()
        if loop.time() >= self._deadline:
            waiter.set_exception(TimeoutError())
        else:
            self._arm(loop, self._deadline)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

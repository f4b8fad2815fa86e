"""The clamd client (mailgate.scan.clamd): the real clamd, and scripted misbehaving peers.

A peer that answers garbage, closes early, never answers or talks too much must give
ScannerUnavailable, never a "clean" verdict. The scripted peers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from mailgate.errors import ScannerUnavailable
from mailgate.scan.clamd import ClamdAddress, ClamdClient, ScanResult
from tests.support.clamd import EICAR, EICAR_FOUND_NAME, ClamdHandle

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("tcp:127.0.0.1:3310", ClamdAddress("127.0.0.1", 3310, "")),
        ("tcp:[::1]:3310", ClamdAddress("::1", 3310, "")),
        ("tcp:localhost:1", ClamdAddress("localhost", 1, "")),
        ("unix:/run/clamav/clamd.ctl", ClamdAddress("", 0, "/run/clamav/clamd.ctl")),
    ],
)
def test_address_parse(spec: str, expected: ClamdAddress) -> None:
    assert ClamdAddress.parse(spec) == expected
    assert str(ClamdAddress.parse(spec)) == spec


@pytest.mark.parametrize(
    "spec", ["", "tcp:", "tcp:host", "tcp:host:0", "tcp::3310", "unix:", "udp:h:1"]
)
def test_address_parse_refuses(spec: str) -> None:
    with pytest.raises(ValueError, match="not a clamd address"):
        ClamdAddress.parse(spec)


def client(spec: str, *, timeout: float = 5.0) -> ClamdClient:
    return ClamdClient(ClamdAddress.parse(spec), timeout=timeout, connect_timeout=2.0)


# --- the real clamd ------------------------------------------------------------------------


def test_ping_version_and_instream(clamd_spec: str) -> None:
    c = client(clamd_spec)

    async def run() -> tuple[str, ScanResult, ScanResult]:
        await c.ping()
        return await c.version(), await c.instream(b"clean data"), await c.instream(EICAR)

    version, clean, virus = asyncio.run(run())
    assert version.startswith("ClamAV 1.")
    assert clean == ScanResult(virus=None)
    assert virus == ScanResult(virus=EICAR_FOUND_NAME)


def test_empty_stream_is_clean(clamd: ClamdHandle) -> None:
    assert asyncio.run(client(clamd.unix_spec).instream(b"")) == ScanResult(virus=None)


def test_chunk_boundaries_do_not_hide_a_signature(clamd: ClamdHandle) -> None:
    # EICAR split across two chunks of 7 bytes each, many times over.
    c = ClamdClient(ClamdAddress.parse(clamd.tcp_spec), timeout=5, connect_timeout=2, chunk_size=7)
    data = b"abc" + EICAR + b"def"
    assert asyncio.run(c.instream(bytearray(data))) == ScanResult(virus=EICAR_FOUND_NAME)


# --- scripted peers --------------------------------------------------------------------------


async def with_peer(
    handler: Handler, action: Callable[[ClamdClient], Awaitable[object]], timeout: float = 5.0
) -> object:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return await action(client(f"tcp:127.0.0.1:{port}", timeout=timeout))
    finally:
        server.close()
        await server.wait_closed()


def replying(data: bytes, *, drain_stream: bool = True) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\0")
        if drain_stream:
            # Read INSTREAM chunks up to the zero-length one (bounded by the test's data).
            for _ in range(10_000):
                size = int.from_bytes(await reader.readexactly(4), "big")
                if size == 0:
                    break
                await reader.readexactly(size)
        writer.write(data)
        await writer.drain()
        writer.close()

    return handler


@pytest.mark.parametrize(
    "reply",
    [
        b"stream: OK",  # no NUL terminator before close
        b"stream: ERROR\0",
        b"stream: Something unexpected\0",
        b"stream:  FOUND\0",  # a FOUND without a name
        b"INSTREAM size limit exceeded. ERROR\0",
        b"",
        b"x" * 10_000,  # longer than any clamd reply
    ],
)
def test_unexpected_instream_replies_are_unavailable(reply: bytes) -> None:
    with pytest.raises(ScannerUnavailable):
        asyncio.run(with_peer(replying(reply), lambda c: c.instream(b"data")))


def test_found_reply_is_parsed() -> None:
    result = asyncio.run(
        with_peer(replying(b"stream: Win.Test.X-1 FOUND\0"), lambda c: c.instream(b"d"))
    )
    assert result == ScanResult(virus="Win.Test.X-1")


def test_bad_ping_and_version_replies_are_unavailable() -> None:
    with pytest.raises(ScannerUnavailable, match="PING"):
        asyncio.run(with_peer(replying(b"PANG\0", drain_stream=False), lambda c: c.ping()))
    with pytest.raises(ScannerUnavailable, match="VERSION"):
        asyncio.run(with_peer(replying(b"Sophos 9\0", drain_stream=False), lambda c: c.version()))


def test_silent_peer_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes

    # The client's own timeout ends the wait (its error says so); a client without one would
    # wait for the silent peer until pytest's timeout.
    with pytest.raises(ScannerUnavailable, match=r"no reply within 0\.3 s"):
        asyncio.run(with_peer(silent, lambda c: c.instream(b"data"), timeout=0.3))


def test_peer_that_closes_at_once_is_unavailable() -> None:
    async def rude(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    with pytest.raises(ScannerUnavailable):
        asyncio.run(with_peer(rude, lambda c: c.instream(b"x" * 5_000_000)))


def test_nothing_listening_is_unavailable() -> None:
    with pytest.raises(ScannerUnavailable, match="cannot connect"):
        asyncio.run(client("unix:/nonexistent/mailgate-test/clamd.sock").ping())

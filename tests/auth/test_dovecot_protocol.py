"""Dovecot's auth protocol: the line format as functions, and answers the real server gives only
when its passdb fails (temporary failure) or when it misbehaves, from a scripted server."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.auth.dovecot import DovecotBackend, auth_request, escape, parse_line, unescape
from mailgate.config import DovecotConfig
from mailgate.errors import AuthUnavailable

HANDSHAKE = b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nSPID\t1\nCUID\t1\nCOOKIE\tc0ffee\nDONE\n"


@given(st.text())
def test_escaping_round_trips_and_never_leaves_a_separator(value: str) -> None:
    escaped = escape(value)
    assert "\t" not in escaped and "\n" not in escaped
    assert unescape(escaped) == value


def test_parse_line_and_the_auth_request() -> None:
    line = parse_line(b"FAIL\t7\tuser=a\x01tb\ttemp", positional=1)
    assert (line.command, line.args, line.options) == ("FAIL", ("7",), {"user": "a\tb", "temp": ""})
    request = auth_request(3, "carol", "pass\tword")
    fields = request.decode().rstrip("\n").split("\t")
    assert fields[:7] == ["AUTH", "3", "PLAIN", "service=smtp", "secured", "no-penalty", "nologin"]
    assert base64.b64decode(fields[7].removeprefix("resp=")) == b"\0carol\0pass\tword"


async def _scripted(path: Path, answer: bytes | None) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HANDSHAKE)
        await reader.readline()  # VERSION
        await reader.readline()  # CPID
        request = await reader.readline()
        request_id = request.split(b"\t")[1]
        if answer is not None:
            writer.write(answer.replace(b"<id>", request_id))
        await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(handle, path=str(path))


@pytest.mark.parametrize("answer", [b"FAIL\t<id>\tuser=carol\ttemp\n",
                                    b"FAIL\t<id>\tcode=temp_fail\n", None,
                                    b"CONT\t<id>\t\n", b"OK\t999999\tuser=carol\n"])  # fmt: skip
def test_temporary_failures_and_nonsense_are_unavailable_never_535(
    tmp_path: Path, answer: bytes | None
) -> None:
    socket_path = tmp_path / "auth-client"
    backend = DovecotBackend(DovecotConfig(socket=f"unix:{socket_path}", timeout=5),
                             default_domain="example.org")  # fmt: skip

    async def scenario() -> None:
        server = await _scripted(socket_path, answer)
        try:
            with pytest.raises(AuthUnavailable):
                await backend.verify("carol", "pw")
        finally:
            server.close()

    asyncio.run(scenario())


def test_a_missing_socket_is_unavailable(tmp_path: Path) -> None:
    backend = DovecotBackend(DovecotConfig(socket=f"unix:{tmp_path / 'none'}"),
                             default_domain="example.org")  # fmt: skip
    with pytest.raises(AuthUnavailable):
        asyncio.run(backend.verify("carol", "pw"))

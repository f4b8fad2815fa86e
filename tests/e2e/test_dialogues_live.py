"""The dialogue transcripts of tests/dialogues, replayed against the live server over sockets."""

from __future__ import annotations

import socket
import ssl
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dialogues.runner import (
    FAKE_LOGIN,
    FAKE_PASSWORD,
    DialogueMismatch,
    Expect,
    ExpectClosed,
    Hangup,
    Send,
    StartTlsNow,
    Transcript,
    is_continuation_wildcard,
    load_transcripts,
    match_reply,
)
from tests.e2e.conftest import client_tls
from tests.support.gateway import Gateway

TRANSCRIPTS = sorted(load_transcripts(), key=lambda t: t.name)
Live = dict[tuple[tuple[str, int], ...], Gateway]
OPTION_KEYS = {"max_message_size", "max_recipients", "max_errors"}


class LiveClient:
    def __init__(self, port: int, implicit_tls: bool) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock: socket.socket = client_tls().wrap_socket(sock) if implicit_tls else sock
        self.buffer = b""
        self.lines: deque[str] = deque()

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buffer += data
        *complete, self.buffer = self.buffer.split(b"\r\n")
        self.lines.extend(line.decode("utf-8", "replace") for line in complete)
        return True

    def next_line(self) -> str | None:
        while not self.lines:
            if not self._fill():
                return None
        return self.lines.popleft()

    def peek(self) -> str | None:
        while not self.lines:
            if not self._fill():
                return None
        return self.lines[0]

    def is_closed(self) -> bool:
        if self.lines:
            return False
        try:
            return not self._fill()
        except (ConnectionResetError, ssl.SSLError):
            return True


def play_live(transcript: Transcript, gw: Gateway) -> None:
    where = transcript.name
    client = LiveClient(gw.ports[transcript.service], transcript.service == "submissions")
    if not transcript.steps or not isinstance(transcript.steps[0], Expect):
        client.next_line()  # the greeting, not checked by this transcript
    try:
        for step in transcript.steps:
            match step:
                case Send(data=data):
                    client.sock.sendall(data)
                case Hangup():
                    client.sock.shutdown(socket.SHUT_WR)
                case Expect(pattern=pattern, line_no=n):
                    line = client.next_line()
                    if line is None or not match_reply(pattern, line):
                        raise DialogueMismatch(f"{where}:{n}: expected {pattern!r}, got {line!r}")
                    if is_continuation_wildcard(pattern):
                        while (nxt := client.peek()) is not None and nxt.startswith(pattern[:4]):
                            client.next_line()
                case StartTlsNow():
                    client.sock = client_tls().wrap_socket(client.sock)
                case ExpectClosed(line_no=n):
                    if not client.is_closed():
                        raise DialogueMismatch(f"{where}:{n}: the server did not close")
    finally:
        client.sock.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """One gateway per distinct set of transcript options, started on first use."""
    gateways: Live = {}
    yield gateways
    for gw in gateways.values():
        gw.stop()


def gateway_for(transcript: Transcript, live: Live,
                root: Path) -> Gateway:  # fmt: skip
    assert set(transcript.options) <= OPTION_KEYS
    key = tuple(sorted(transcript.options.items()))
    if key not in live:
        gw = Gateway(root / f"gw{len(live)}", {"limits": dict(transcript.options)})
        gw.add_user(FAKE_LOGIN, FAKE_PASSWORD)
        gw.start("--no-delivery")
        live[key] = gw
    return live[key]


@pytest.mark.parametrize("transcript", TRANSCRIPTS, ids=[t.name for t in TRANSCRIPTS])
def test_dialogue_against_live_server(
    transcript: Transcript, live: Live,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:  # fmt: skip
    root = tmp_path_factory.getbasetemp() / "dialogues"
    play_live(transcript, gateway_for(transcript, live, root))

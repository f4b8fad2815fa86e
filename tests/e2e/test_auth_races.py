"""Issue #11, classes 6 and 7 against a live `mailgate serve`: AUTH bursts and port 465.

Class 6: many connections from one address (or many addresses at one login) send AUTH at the
same moment. Every attempt is counted before its password hash is verified, and a client (or
a login) has at most `auth_parallel_per_client` (`auth_parallel_per_login`) attempts in
flight: the burst is refused at the thresholds, with the right password in it too.

Class 7: on 465 (implicit TLS) the connection limits and the AUTH guard's lock-out apply to
the TCP connection, before the TLS handshake: idle connections beyond the per-address limit
are closed at once, and a locked-out client gets no handshake at all.

Clients use their own source addresses in 127.0.0.0/8, so each test is its own client.
"""

from __future__ import annotations

import select
import socket
import ssl
from collections import Counter
from pathlib import Path

import pytest

from mailgate import replies
from tests.e2e.conftest import ALICE, client_tls
from tests.e2e.test_abuse_limits import ONE_PROCESS, auth_once, plain, start
from tests.e2e.test_attacks import Client, line
from tests.support.gateway import HOSTNAME, Gateway
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

BAD = line(replies.BAD_CREDENTIALS)
LOCKED = line(replies.TOO_MANY_AUTH_FAILURES)
BUSY = line(replies.TOO_MANY_AUTH_IN_PROGRESS)


def burst(gw: Gateway, attempts: list[tuple[str, str, str]], *, last_after: int = 0) -> list[bytes]:
    """Open one implicit-TLS connection per (source, login, password), say EHLO on each, then
    send the AUTH lines before reading any answer, so the server sees them at once. With
    `last_after`, the last AUTH is sent only once that many 454 refusals have come back (the
    earlier attempts have all been counted; the verified ones may still be running), so the
    server cannot take it before the others. Returns the AUTH replies in order, after checking
    that every refused connection was closed."""
    clients = [Client(gw.ports["submissions"], source=src, tls=True) for src, _, _ in attempts]
    try:
        for c in clients:
            assert c.greeting.startswith(b"220 "), c.greeting
            assert c.cmd(b"EHLO burst.test").startswith(b"250")
        lines = [plain(login, password) + b"\r\n" for _, login, password in attempts]
        held = len(clients) - 1 if last_after else len(clients)
        for c, data in zip(clients[:held], lines, strict=False):
            c.send(data)
        answers: dict[int, bytes] = {}
        if last_after:

            def refused_enough() -> bool:
                """Read the replies that came; whether `last_after` of them are 454."""
                waiting = {c.sock.fileno(): i for i, c in enumerate(clients[:held])
                           if i not in answers}  # fmt: skip
                assert waiting, f"every client answered, too few refusals: {answers}"
                readable, _, _ = select.select(list(waiting), [], [], 0.1)
                for fd in readable:
                    answers[waiting[fd]] = clients[waiting[fd]].reply()
                return sum(a.startswith(b"454 ") for a in answers.values()) >= last_after

            wait_for(refused_enough, timeout=20, what=f"{last_after} refusals (454)")
            clients[-1].send(lines[-1])
        for i, c in enumerate(clients):
            if i not in answers:
                answers[i] = c.reply()
        for i, c in enumerate(clients):
            if answers[i].startswith(b"454 "):
                assert c.rest() == b"", "a refused AUTH must close the connection"
        return [answers[i] for i in range(len(clients))]
    finally:
        for c in clients:
            c.close()


def assert_five_counted(answers: list[bytes]) -> None:
    """Twenty wrong passwords at once against a threshold of five (auth_refuse_after or
    auth_login_refuse_after): exactly five attempts were counted before the lock; at most
    auth_parallel_per_* (4 by default) of them were verified (535), the rest of those five were
    refused because four were already in flight (454 ... in progress); every later one found
    the lock (454 ... failures)."""
    seen = Counter(answers)
    assert set(seen) <= {BAD, LOCKED, BUSY}, seen
    assert seen[BAD] + seen[BUSY] == 5, seen
    assert 2 <= seen[BAD] <= 4, seen
    assert seen[LOCKED] == 15, seen


# --- class 6: parallel AUTH ------------------------------------------------------------------


def guarded(tmp_path: Path, stopping: list[Gateway], *, per_client: int, per_login: int) -> Gateway:
    """A gateway (one process) that delays from the third failure and locks at the thresholds."""
    gw = start(tmp_path / "gw", {"ratelimits": {
        "auth_delay_after": 2, "auth_base_delay": 0.25, "auth_max_delay": 0.5,
        "auth_refuse_after": per_client, "auth_login_refuse_after": per_login},
        **ONE_PROCESS})  # fmt: skip
    stopping.append(gw)
    return gw


def test_a_burst_from_one_address_is_refused_at_the_thresholds_right_password_included(
    tmp_path: Path, stopping: list[Gateway]
) -> None:
    gw = guarded(tmp_path, stopping, per_client=5, per_login=50)
    source = "127.0.0.50"
    attempts = [(source, "alice", f"guess{n}") for n in range(20)] + [(source, *ALICE)]
    answers = burst(gw, attempts, last_after=15)
    wrong, right = answers[:20], answers[20]
    assert_five_counted(wrong)
    # The right password came in the same burst: it is refused like any other attempt.
    assert right == LOCKED, right
    assert "auth ok" not in gw.log_text()
    # And the client is now locked out at connect: 421 on 587 (on 465 no handshake, below).
    with socket.create_connection(("127.0.0.1", gw.ports["submission"]), timeout=10,
                                  source_address=(source, 0)) as s:  # fmt: skip
        assert s.recv(4096) == line(replies.CLIENT_LOCKED_OUT)


def test_a_burst_at_one_login_from_many_addresses_is_refused_at_the_login_threshold(
    tmp_path: Path, stopping: list[Gateway]
) -> None:
    gw = guarded(tmp_path, stopping, per_client=50, per_login=5)
    # alice's usual client logged in before the attack: it stays trusted.
    assert auth_once(gw, "127.0.0.61", *ALICE)[0] == line(replies.AUTH_SUCCEEDED)
    attempts = [(f"127.0.4.{n + 1}", "alice", f"guess{n}") for n in range(20)]
    attempts.append(("127.0.4.100", *ALICE))  # the right password from a new address
    answers = burst(gw, attempts, last_after=15)
    assert_five_counted(answers[:20])
    assert answers[20] == LOCKED, answers[20]
    # alice herself, from the client she used before, still logs in.
    assert auth_once(gw, "127.0.0.61", *ALICE)[0] == line(replies.AUTH_SUCCEEDED)


def test_parallel_logins_of_an_honest_client_all_succeed(
    tmp_path: Path, stopping: list[Gateway]
) -> None:
    gw = start(tmp_path / "gw", ONE_PROCESS)
    stopping.append(gw)
    answers = burst(gw, [("127.0.0.70", *ALICE)] * 4)
    assert answers == [line(replies.AUTH_SUCCEEDED)] * 4


# --- class 7: port 465 before the handshake ------------------------------------------------------


def test_idle_connections_to_465_beyond_the_per_address_limit_are_closed_at_once(
    tmp_path: Path, stopping: list[Gateway]
) -> None:
    gw = start(tmp_path / "gw", {"limits": {"max_connections_per_ip": 5}, **ONE_PROCESS})
    stopping.append(gw)
    port = gw.ports["submissions"]
    held: list[socket.socket] = []
    try:
        for _ in range(200):  # bounded: 200 idle TCP connections, no TLS ClientHello
            s = socket.create_connection(("127.0.0.1", port), timeout=10,
                                         source_address=("127.0.0.80", 0))  # fmt: skip
            held.append(s)
        # The server closes every connection over the limit without a byte of TLS or SMTP.
        for s in held[5:]:
            assert closed_without_a_byte(s)
        # The first five are kept waiting for their handshake (bounded by its timeout).
        for s in held[:5]:
            s.settimeout(0.2)
            with pytest.raises(TimeoutError):
                s.recv(4096)
    finally:
        for s in held:
            s.close()
    # Another address is not affected: it gets its handshake and its greeting.
    c = Client(port, source="127.0.0.81", tls=True)
    assert c.greeting.startswith(b"220 ")
    c.close()


def test_a_locked_out_client_gets_no_tls_handshake_on_465(
    tmp_path: Path, stopping: list[Gateway]
) -> None:
    gw = start(tmp_path / "gw", {"ratelimits": {
        "auth_delay_after": 50, "auth_refuse_after": 3, "auth_login_refuse_after": 50},
        **ONE_PROCESS})  # fmt: skip
    stopping.append(gw)
    source = "127.0.0.90"
    for n in range(3):
        assert auth_once(gw, source, "alice", f"guess{n}")[0] == BAD
    port = gw.ports["submissions"]
    # A raw ClientHello: the server answers it with nothing (no ServerHello) and closes.
    hello = client_hello()
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as s:  # fmt: skip
        s.sendall(hello)
        assert closed_without_a_byte(s)
    # Python's TLS client sees the handshake fail.
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s,
        pytest.raises((ssl.SSLError, ConnectionError)),
    ):
        client_tls().wrap_socket(s, server_hostname=HOSTNAME)
    wait_for(lambda: "too many AUTH failures" in gw.log_text(), timeout=5, what="the refusal")
    assert "tls handshake" not in gw.log_text().split("too many AUTH failures")[-1]


def closed_without_a_byte(s: socket.socket) -> bool:
    """The server closed `s` (FIN, or RST when our bytes were left unread) and sent nothing."""
    s.settimeout(10)
    try:
        return s.recv(4096) == b""
    except ConnectionResetError:
        return True


def client_hello() -> bytes:
    """The first flight of a TLS client, as bytes."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_tls().wrap_bio(incoming, outgoing, server_hostname=HOSTNAME)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()

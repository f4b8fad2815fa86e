"""The kernel ban (receive.kernelban) in the real kernel, then through `mailgate serve`.

A banned source's SYNs are dropped by the listening socket's filter: its connect() times out,
while other sources connect, and connections made before the ban keep working. Through the
server: a client locked out by the AUTH guard that keeps reconnecting is refused with 421 4.7.0
`auth_ban_after` times, then dropped in the kernel for `auth_ban_period`, logged once; honest
clients are unaffected, and after the period the client reaches the server again.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate import replies
from mailgate.receive.kernelban import KernelBan
from tests.e2e.conftest import BOB
from tests.e2e.test_abuse_limits import auth_once, start
from tests.e2e.test_attacks import Client, connect, line
from tests.e2e.test_workers import listening
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

DROPPED = 0.5  # seconds a connect() waits before we call its SYN dropped (loopback answers in µs)


def listener(family: int = socket.AF_INET, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, 0))
    sock.listen(16)
    return sock


def connects(server: socket.socket, source: str) -> bool:
    """True if a TCP connection from `source` is established within DROPPED seconds."""
    host, port = server.getsockname()[:2]
    try:
        socket.create_connection((host, port), timeout=DROPPED, source_address=(source, 0)).close()
    except TimeoutError:
        return False
    return True


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def server() -> Iterator[socket.socket]:
    sock = listener()
    yield sock
    sock.close()


def test_banned_source_is_dropped_others_connect_and_the_ban_lifts(server: socket.socket) -> None:
    clock = Clock()
    ban = KernelBan(clock)
    ban.add_socket(server)
    host, port = server.getsockname()
    before = socket.create_connection((host, port), timeout=5, source_address=("127.0.0.2", 0))
    accepted, _ = server.accept()

    assert ban.ban(ipaddress.ip_network("127.0.0.2/32"), 60)
    assert ban.working
    assert not connects(server, "127.0.0.2")
    assert connects(server, "127.0.0.3")
    # the connection made before the ban still carries data both ways
    before.sendall(b"ping")
    assert accepted.recv(4) == b"ping"
    accepted.sendall(b"pong")
    assert before.recv(4) == b"pong"
    before.close()
    accepted.close()

    clock.t += 61
    assert ban.expire() is None
    assert connects(server, "127.0.0.2")


def test_a_network_ban_covers_its_addresses(server: socket.socket) -> None:
    ban = KernelBan()
    ban.add_socket(server)
    assert ban.ban(ipaddress.ip_network("127.0.9.0/24"), 60)
    assert not connects(server, "127.0.9.7")
    assert connects(server, "127.0.10.7")


def test_ipv6_ban() -> None:
    try:
        sock = listener(socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with sock:
        ban = KernelBan()
        ban.add_socket(sock)
        assert connects(sock, "::1")
        assert ban.ban(ipaddress.ip_network("::/64"), 60)
        assert not connects(sock, "::1")


# --- through the server ---------------------------------------------------------------------


def every_worker_listens(log: str) -> bool:
    """Every worker has joined the steering groups of both AUTH ports (587 and 465)."""
    started = re.search(r"mailgate started hostname=\S+ workers=(\d+)", log)
    workers = max(1, int(started.group(1))) if started is not None else 0
    return started is not None and all(
        len(listening(log, service)) >= workers for service in ("submission", "submissions")
    )


def test_locked_out_client_that_keeps_reconnecting_is_dropped_in_the_kernel(
    tmp_path: Path,
) -> None:
    gw = start(
        tmp_path / "gw",
        {"ratelimits": {"auth_delay_after": 5, "auth_refuse_after": 2,
                        "auth_ban_after": 3, "auth_ban_period": 3.0}},
    )  # fmt: skip
    try:
        # The guesses (465) and the reconnects (587) must reach the same worker: until every
        # worker has joined both ports' steering groups, the kernel may send them to different
        # ones (once they have, socket i of each group is worker i's: cli.serve.BindingTurn).
        wait_for(lambda: every_worker_listens(gw.log_text()), timeout=20,
                 what="every worker listening")  # fmt: skip
        for n in range(2):
            reply, _ = auth_once(gw, "127.0.0.4", "alice", f"guess{n}")
            assert reply == line(replies.BAD_CREDENTIALS)
        port = gw.ports["submission"]
        for _ in range(3):  # auth_ban_after refusals, each with its clear answer
            with connect(port, source="127.0.0.4") as c:
                assert c.greeting == line(replies.CLIENT_LOCKED_OUT)
        wait_for(lambda: "client banned in the kernel client=[127.0.0.4]" in gw.log_text(),
                 timeout=5, what="the ban's log line")  # fmt: skip
        for dropped_on in (port, gw.ports["submissions"]):
            began = time.monotonic()
            with pytest.raises(TimeoutError):
                Client(dropped_on, source="127.0.0.4", timeout=DROPPED)
            assert time.monotonic() - began >= DROPPED * 0.9
        assert auth_once(gw, "127.0.0.5", *BOB)[0] == line(replies.AUTH_SUCCEEDED)

        def greeted() -> bytes | None:
            try:
                with connect(port, source="127.0.0.4", timeout=DROPPED) as c:
                    return c.greeting
            except TimeoutError:
                return None

        # after auth_ban_period the client reaches the server again (still locked out: 421)
        assert wait_for(greeted, timeout=10, what="the ban to lift") == line(
            replies.CLIENT_LOCKED_OUT
        )
        assert gw.log_text().count("client banned in the kernel client=[127.0.0.4]") == 1
    finally:
        gw.finish()

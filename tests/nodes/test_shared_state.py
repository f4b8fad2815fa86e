"""Two `mailgate serve` nodes on one PostgreSQL directory and one Redis (`[state] url`): what one
node counts, the other enforces. And a node whose Redis goes away keeps accepting mail.
Real PostgreSQL and Redis; a database and a key prefix per test; the Redis that is stopped is
this test's own redis-server on a free port."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from mailgate import replies
from tests.e2e.test_attacks import Client, connect, line
from tests.e2e.test_operations import http_get
from tests.e2e.test_workers import listening, send_from, worker_of
from tests.support.databases import REDIS, postgres_database, redis_prefix
from tests.support.gateway import Gateway, run_cli, started
from tests.support.ports import free_port
from tests.support.waiting import wait_for

PASSWORD = "correct horse battery"
RCPTS = [b"a@remote.test", b"b@remote.test"]


def plain(login: str, password: str) -> bytes:
    import base64

    return b"AUTH PLAIN " + base64.b64encode(f"\0{login}\0{password}".encode())


def node(root: Path, url: str, state: dict[str, str], ratelimits: dict[str, Any],
         workers: int = 1) -> Gateway:  # fmt: skip
    return Gateway(root, {"directory": {"url": url}, "server": {"workers": workers},
                          "state": state, "ratelimits": ratelimits})  # fmt: skip


@pytest.fixture
def prefix() -> Iterator[str]:
    with redis_prefix() as p:
        yield p


@contextlib.contextmanager
def two_nodes(tmp_path: Path, prefix: str, ratelimits: dict[str, Any]) -> Iterator[
    tuple[Gateway, Gateway]
]:  # fmt: skip
    state = {"url": REDIS, "prefix": prefix}
    with postgres_database() as url:
        a = node(tmp_path / "a", url, state, ratelimits)
        b = node(tmp_path / "b", url, state, ratelimits)
        run_cli(a.config, "directory", "migrate")
        a.add_user("carol", PASSWORD)
        with started(a, b):
            yield a, b


def send_one(c: Client, rcpts: list[bytes]) -> bytes:
    """MAIL, RCPTs, DATA as carol; the first refusal (then RSET), or the final reply."""
    reply = c.cmd(b"MAIL FROM:<carol@example.org>")
    if reply != line(replies.SENDER_OK):
        return reply
    for rcpt in rcpts:
        reply = c.cmd(b"RCPT TO:<" + rcpt + b">")
        if reply != line(replies.RECIPIENT_OK):
            c.cmd(b"RSET")
            return reply
    reply = c.cmd(b"DATA")  # checked again: another session may have used the limit meanwhile
    if reply != line(replies.START_DATA):
        c.cmd(b"RSET")
        return reply
    return c.cmd(b"From: carol@example.org\r\nSubject: hi\r\n\r\nhello\r\n.")


@contextlib.contextmanager
def logged_in(gw: Gateway, source: str) -> Iterator[Client]:
    with connect(gw.ports["submissions"], source=source, tls=True) as c:
        c.cmd(b"EHLO client.test")
        assert c.cmd(plain("carol", PASSWORD)) == line(replies.AUTH_SUCCEEDED)
        yield c


def test_an_auth_lock_out_reached_through_node_a_holds_on_node_b(
    tmp_path: Path, prefix: str
) -> None:
    limits = {"auth_delay_after": 10, "auth_refuse_after": 50, "auth_login_refuse_after": 3}
    with two_nodes(tmp_path, prefix, limits) as (a, b):
        for i in range(3):  # wrong passwords through A, each from another address
            with connect(a.ports["submissions"], source=f"127.0.0.{60 + i}", tls=True) as c:
                c.cmd(b"EHLO client.test")
                assert c.cmd(plain("carol", "wrong")) == line(replies.BAD_CREDENTIALS)
        # Through B, from an address never used, even the right password is refused.
        with connect(b.ports["submissions"], source="127.0.0.70", tls=True) as c:
            c.cmd(b"EHLO client.test")
            assert c.cmd(plain("carol", PASSWORD)) == (
                b"454 4.7.0 Too many authentication failures, try again later\r\n"
            )
        assert "auth refused too_many_failures login=carol failures=3" in b.log_text()


def test_a_per_login_rate_limit_reached_through_node_a_holds_on_node_b(
    tmp_path: Path, prefix: str
) -> None:
    limits = {"login_messages_per_hour": 2, "breaker_recipients_per_hour": 0}
    with two_nodes(tmp_path, prefix, limits) as (a, b):
        with logged_in(a, "127.0.0.80") as c:
            for _ in range(2):
                assert send_one(c, [b"x@remote.test"]).startswith(b"250 2.0.0 Ok: queued as ")
        with logged_in(b, "127.0.0.81") as c:
            assert send_one(c, [b"x@remote.test"]) == (
                b"450 4.7.1 Too many messages per hour from this account (limit 2),"
                b" please try again later\r\n"
            )
        assert len(a.queued()) == 2 and b.queued() == []


def test_the_breaker_trips_once_for_the_whole_cluster(tmp_path: Path, prefix: str) -> None:
    # Two messages of two recipients through each node, the nodes side by side: with counters
    # per node each would see 4 > 3 and suspend; shared, the cluster trips once.
    with two_nodes(tmp_path, prefix, {"breaker_recipients_per_hour": 3}) as (a, b):
        answers: dict[str, list[bytes]] = {"a": [], "b": []}
        errors: list[BaseException] = []
        both_logged_in = threading.Barrier(2, timeout=30)  # a suspension refuses a later AUTH

        def send(gw: Gateway, name: str, source: str) -> None:
            try:
                with logged_in(gw, source) as c:
                    both_logged_in.wait()
                    for _ in range(2):
                        answers[name].append(send_one(c, RCPTS))
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=send, args=(a, "a", "127.0.0.90")),
                   threading.Thread(target=send, args=(b, "b", "127.0.0.91"))]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors and not any(t.is_alive() for t in threads), errors
        wait_for(lambda: "ALERT account suspended" in a.log_text() + b.log_text(), timeout=10)
        logs = a.log_text() + b.log_text()
        assert logs.count("ALERT ratelimit breaker tripped login=carol") == 1, answers
        assert logs.count("ALERT account suspended login=carol") == 1, answers
        refused = b"450 4.7.1 Sending from this account is suspended, contact the postmaster\r\n"
        assert all(r.startswith(b"250 ") or r == refused for r in answers["a"] + answers["b"])
        # Every node refuses the login now (the trip is in Redis; the suspension in PostgreSQL).
        for gw, source in ((a, "127.0.0.92"), (b, "127.0.0.93")):
            with connect(gw.ports["submissions"], source=source, tls=True) as c:
                c.cmd(b"EHLO client.test")
                reply = c.cmd(plain("carol", PASSWORD))
                if reply == line(replies.AUTH_SUCCEEDED):  # the directory view catches up
                    assert send_one(c, [b"x@remote.test"]) == refused
                else:
                    assert reply == line(replies.BAD_CREDENTIALS)


class OwnRedis:
    """A redis-server of this test's own on a free port, stopped by its PID."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        server = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [server, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(self._answers, timeout=10, what="redis-server answering")

    def _answers(self) -> bool:
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


def test_redis_stopped_mail_is_accepted_and_the_warning_logged(tmp_path: Path) -> None:
    own = OwnRedis()
    own.start()
    admin = free_port()
    gw = Gateway(tmp_path / "gw", {"server": {"workers": 1}, "state": {"url": own.url},
                                   "admin": {"listen": [f"127.0.0.1:{admin}"]},
                                   "ratelimits": {"login_messages_per_hour": 100}})  # fmt: skip
    gw.add_user("carol", PASSWORD)
    gw.start("--no-delivery")
    try:
        with logged_in(gw, "127.0.0.100") as c:
            assert send_one(c, [b"x@remote.test"]).startswith(b"250 2.0.0 Ok: queued as ")
        assert http_get(gw, "/readyz") == (200, "ready\n")
        own.stop()
        with logged_in(gw, "127.0.0.101") as c:
            assert send_one(c, [b"x@remote.test"]).startswith(b"250 2.0.0 Ok: queued as ")
            assert send_one(c, [b"y@remote.test"]).startswith(b"250 2.0.0 Ok: queued as ")
        warning = f"state unavailable url={own.url} counting per process: "
        wait_for(lambda: warning in gw.log_text(), timeout=10, what="the warning")
        assert gw.log_text().count(warning) == 1  # one line a minute, not one per command
        status, body = http_get(gw, "/readyz")
        assert status == 200 and body.startswith("ready, degraded\nstate: "), body
        assert f"redis://127.0.0.1:{own.port}/0" in body and "counting per process" in body
        # Redis back on the same port: the node uses it again by itself.
        own.start()
        with logged_in(gw, "127.0.0.102") as c:
            wait_for(lambda: send_one(c, [b"z@remote.test"]).startswith(b"250 ")
                     and "state reachable again" in gw.log_text(), timeout=20,
                     what="the node using Redis again")  # fmt: skip
        assert http_get(gw, "/readyz") == (200, "ready\n")
    finally:
        gw.finish()
        own.stop()


@pytest.mark.parametrize(("pin_clients", "workers_used"), [("auto", 2), ("yes", 1)])
def test_with_shared_counters_one_submission_client_uses_every_worker(
    tmp_path: Path, prefix: str, pin_clients: str, workers_used: int
) -> None:
    gw = Gateway(tmp_path / "gw", {"server": {"workers": 2, "pin_clients": pin_clients},
                                   "state": {"url": REDIS, "prefix": prefix}})  # fmt: skip
    gw.start("--no-delivery")
    try:
        wait_for(lambda: len(listening(gw.log_text(), "submission")) == 2, timeout=15,
                 what="both workers listening")  # fmt: skip
        for _ in range(30):  # the kernel hashes the 4-tuple: 2**-29 that one worker gets all
            send_from(gw, "127.0.0.10", "submission")
        assert len(worker_of(gw.log_text(), "127.0.0.10", "submission")) == workers_used
    finally:
        gw.stop()

"""The Lua-backed counters (limits.shared through limits.counters) against the machine's real
Redis, each test under its own key prefix. Two `Counters` on one prefix stand for two worker
processes (or two nodes): what one counts, the other sees."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import random
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import redis

from mailgate import replies
from mailgate.config import RateLimitsConfig
from mailgate.errors import Rejected
from mailgate.limits import AuthDecision, AuthGuard, Limits
from mailgate.limits.counters import FRESH, Counters
from mailgate.limits.shared import SharedState, StateUnavailable
from tests.support.databases import REDIS, redis_prefix
from tests.support.ports import accepts, free_port
from tests.support.testca import TestCA
from tests.support.waiting import wait_for

T = TypeVar("T")
IP = "192.0.2.7"


@pytest.fixture
def prefix() -> Iterator[str]:
    with redis_prefix() as p:
        yield p


def node(cfg: RateLimitsConfig, prefix: str, url: str = REDIS) -> Counters:
    return Counters(Limits(cfg), AuthGuard(cfg), SharedState(url, prefix))


def run(make: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await make()

    return asyncio.run(main())


def test_rate_script_adds_reads_and_keeps_a_window(prefix: str) -> None:
    async def go() -> None:
        state = SharedState(REDIS, prefix)

        async def hour(amounts: list[int]) -> tuple[str, list[int]]:
            return await state.rate("-", ["a", "b"], amounts, window=3600.0, buckets=60)

        try:
            assert await hour([1, 5]) == ("", [1, 5])
            assert await hour([0, 0]) == ("", [1, 5])
            assert await hour([2, 0]) == ("", [3, 5])
            # A window of one one-second bucket: the count falls to 0 once the second is over.
            assert (await state.rate("-", ["short"], [4], window=1, buckets=1))[1] == [4]
            deadline = asyncio.get_running_loop().time() + 10
            while (await state.rate("-", ["short"], [0], window=1, buckets=1))[1] != [0]:
                assert asyncio.get_running_loop().time() < deadline, "the bucket never expired"
                await asyncio.sleep(0.05)  # polling a bounded wait
        finally:
            await state.close()

    run(go)


def test_a_per_login_limit_reached_through_one_process_holds_on_another(prefix: str) -> None:
    cfg = RateLimitsConfig(login_messages_per_hour=2, breaker_recipients_per_hour=0)

    async def go() -> None:
        a, b = node(cfg, prefix), node(cfg, prefix)
        try:
            for _ in range(2):
                await a.check_message(service="submission", login="Alice", ip=IP, nrcpt=1)
                assert await a.record_message(service="submission", login="alice", ip=IP,
                                              nrcpt=1) is None  # fmt: skip
            with pytest.raises(Rejected) as refused:
                await b.check_recipient(service="submissions", login="alice", ip="198.51.100.1",
                                        rcpt_in_message=1)  # fmt: skip
            assert (refused.value.reply.code, refused.value.reply.status) == (450, "4.7.1")
            assert "limit=login_messages_per_hour max=2 count=3" in refused.value.reason
            # Another login is not limited.
            await b.check_message(service="submission", login="bob", ip=IP, nrcpt=1)
        finally:
            await a.close()
            await b.close()

    run(go)


def test_the_breaker_trips_once_for_the_whole_cluster(prefix: str) -> None:
    cfg = RateLimitsConfig(breaker_recipients_per_hour=5)

    async def go() -> None:
        nodes = [node(cfg, prefix) for _ in range(3)]
        try:
            trips = await asyncio.gather(*(
                n.record_message(service="submission", login="mallory", ip=IP, nrcpt=2)
                for n in nodes for _ in range(4)
            ))  # fmt: skip
            tripped = [t for t in trips if t is not None]
            assert len(tripped) == 1
            assert tripped[0].metric == "recipients_per_hour" and tripped[0].threshold == 5
            for n in nodes:  # every process refuses the login while its count is over
                with pytest.raises(Rejected) as refused:
                    await n.check_message(service="submission", login="mallory", ip=IP, nrcpt=1)
                assert refused.value.reply.code == 450
                reason = refused.value.reason
                assert "ratelimit breaker login=mallory recipients_per_hour=" in reason
        finally:
            for n in nodes:
                await n.close()

    run(go)


def test_auth_failures_through_one_process_lock_the_login_out_on_another(prefix: str) -> None:
    cfg = RateLimitsConfig(auth_delay_after=10, auth_refuse_after=20, auth_login_refuse_after=3)

    async def go() -> None:
        a, b = node(cfg, prefix), node(cfg, prefix)
        try:
            for i in range(3):
                decision = await a.begin_attempt(f"198.51.100.{i}", "carol")
                assert decision.action == "allow" and decision.attempt
                await a.end_attempt(f"198.51.100.{i}", "carol", decision, succeeded=False,
                                    verified=True)  # fmt: skip
            refused = await b.begin_attempt("203.0.113.9", "Carol")
            assert refused.is_refused and refused.reply == replies.TOO_MANY_AUTH_FAILURES
            assert refused.reason == "login=carol failures=3"
        finally:
            await a.close()
            await b.close()

    run(go)


async def locked_out(counters: Counters, ip: str) -> bool:
    """Whether a connection from `ip` is refused at connect as locked out of AUTH (as
    receive/serve.py asks: one `admit` for the count and the lock-out)."""
    return (await counters.admit(ip, 1000, lockout=True))[1]


def test_a_client_locked_out_on_one_process_is_refused_at_connect_on_another(prefix: str) -> None:
    cfg = RateLimitsConfig(auth_delay_after=10, auth_refuse_after=2, auth_login_refuse_after=10)

    async def go() -> None:
        a, b = node(cfg, prefix), node(cfg, prefix)
        try:
            assert not await locked_out(b, IP)
            for login in ("u1", "u2"):
                d = await a.begin_attempt(IP, login)
                await a.end_attempt(IP, login, d, succeeded=False, verified=True)
            assert await locked_out(b, IP)
            assert not await locked_out(b, "192.0.2.8")
        finally:
            await a.close()
            await b.close()

    run(go)


def test_success_forgets_the_pairs_failures_and_unverified_takes_the_attempt_back(
    prefix: str,
) -> None:
    cfg = RateLimitsConfig(auth_delay_after=1, auth_refuse_after=10, auth_login_refuse_after=10)

    async def go() -> None:
        a, b = node(cfg, prefix), node(cfg, prefix)
        try:
            d = await a.begin_attempt(IP, "dave")
            await a.end_attempt(IP, "dave", d, succeeded=False, verified=True)
            assert (await b.begin_attempt(IP, "dave")).action == "delay"  # one failure counted
            # That attempt (in flight) is ended as unverified: the backend could not answer.
            d = await b.begin_attempt(IP, "erin")
            await b.end_attempt(IP, "erin", d, succeeded=False, verified=False)
            # A success from IP as dave forgets dave's failures from IP. The client's count is
            # then 0 (erin's attempt was taken back), so a new login from IP is not delayed.
            d = await a.begin_attempt(IP, "dave")
            await a.end_attempt(IP, "dave", d, succeeded=True, verified=True)
            assert (await b.begin_attempt(IP, "kate")).action == "allow"
        finally:
            await a.close()
            await b.close()

    run(go)


def test_attempts_in_flight_are_capped_across_processes(prefix: str) -> None:
    cfg = RateLimitsConfig(auth_delay_after=50, auth_refuse_after=50, auth_login_refuse_after=50,
                           auth_parallel_per_login=2, auth_parallel_per_client=50)  # fmt: skip

    async def go() -> None:
        a, b = node(cfg, prefix), node(cfg, prefix)
        try:
            first = await a.begin_attempt("198.51.100.1", "gina")
            second = await b.begin_attempt("198.51.100.2", "gina")
            assert not first.is_refused and not second.is_refused
            third = await a.begin_attempt("198.51.100.3", "gina")
            assert third.is_refused and third.reply == replies.TOO_MANY_AUTH_IN_PROGRESS
            await b.end_attempt("198.51.100.2", "gina", second, succeeded=False, verified=True)
            fourth = await b.begin_attempt("198.51.100.4", "gina")
            assert not fourth.is_refused
        finally:
            await a.close()
            await b.close()

    run(go)


def test_connections_per_address_are_counted_across_processes(prefix: str) -> None:
    async def go() -> None:
        a, b = node(RateLimitsConfig(), prefix), node(RateLimitsConfig(), prefix)
        try:
            assert await a.open_connection(IP, 3) == "shared"
            assert await b.open_connection(IP, 3) == "shared"
            assert await b.open_connection(IP, 3) == "shared"
            assert await a.open_connection(IP, 3) == "refused"
            assert await a.open_connection("192.0.2.8", 3) == "shared"
            await b.close_connection(IP)
            assert await a.open_connection(IP, 3) == "shared"
            # A process that died (its heartbeat gone) no longer counts: b held 1 of the 3.
            assert b.shared is not None
            client = redis.Redis.from_url(REDIS)
            client.delete(b.shared.key("proc", b.shared.process))
            client.close()
            assert await a.open_connection(IP, 3) == "shared"
            assert await a.open_connection(IP, 3) == "refused"
        finally:
            await a.close()
            await b.close()

    run(go)


def test_redis_unreachable_counts_per_process_with_one_warning(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = RateLimitsConfig(login_messages_per_hour=1, breaker_recipients_per_hour=0)
    url = f"redis://127.0.0.1:{free_port()}/0"  # nobody listens there

    async def go() -> None:
        clock = [1000.0]
        state = SharedState(url, prefix, now=lambda: clock[0])
        counters = Counters(Limits(cfg), AuthGuard(cfg), state)
        try:
            await counters.check_message(service="submission", login="h", ip=IP, nrcpt=1)
            assert not state.is_available and "ConnectionRefusedError" in state.error
            await counters.record_message(service="submission", login="h", ip=IP, nrcpt=1)
            with pytest.raises(Rejected) as refused:  # the per-process counter holds
                await counters.check_message(service="submission", login="h", ip=IP, nrcpt=1)
            assert refused.value.reply.code == 450
            assert await counters.open_connection(IP, 5) == "local"
            decision = await counters.begin_attempt(IP, "h")
            assert decision.attempt == ""  # counted in this process
            await counters.end_attempt(IP, "h", decision, succeeded=False, verified=True)
            clock[0] += 30.0  # Redis asked again after its retry pause: still down, no new line
            await counters.check_message(service="submission", login="other", ip="192.0.2.99",
                                         nrcpt=1)  # fmt: skip
            clock[0] += 61.0  # a minute later: one more line
            await counters.check_message(service="submission", login="other", ip="192.0.2.99",
                                         nrcpt=1)  # fmt: skip
        finally:
            await counters.close()

    with caplog.at_level(logging.WARNING, logger="mailgate.limits.shared"):
        run(go)
    lines = [r.getMessage() for r in caplog.records if "state unavailable" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"state unavailable url={url} counting per process: ")


def test_a_trip_value_that_cannot_be_read_is_ignored(prefix: str) -> None:
    cfg = RateLimitsConfig(breaker_recipients_per_hour=100)

    async def go() -> None:
        a = node(cfg, prefix)
        try:
            assert a.shared is not None
            client = redis.Redis.from_url(REDIS)
            client.set(a.shared.key("trip", "ivan"), "nonsense")
            client.close()
            await a.check_message(service="submission", login="ivan", ip=IP, nrcpt=1)
        finally:
            await a.close()

    run(go)


def test_exempt_clients_are_counted_per_login_only(prefix: str) -> None:
    import ipaddress

    cfg = dataclasses.replace(
        RateLimitsConfig(auth_delay_after=10, auth_refuse_after=1, auth_login_refuse_after=10),
        exempt_networks=(ipaddress.ip_network("192.0.2.0/24"),),
    )

    async def go() -> None:
        a = node(cfg, prefix)
        try:
            for login in ("j1", "j2"):
                d = await a.begin_attempt(IP, login)
                assert not d.is_refused
                await a.end_attempt(IP, login, d, succeeded=False, verified=True)
            assert not await locked_out(a, IP)
        finally:
            await a.close()

    run(go)


def test_a_connection_closed_while_redis_was_away_is_taken_back_later(prefix: str) -> None:
    async def go() -> None:
        clock = [1000.0]
        state = SharedState(REDIS, prefix, now=lambda: clock[0])
        counters = Counters(Limits(RateLimitsConfig()), AuthGuard(RateLimitsConfig()), state)
        try:
            assert await counters.open_connection(IP, 1) == "shared"
            state._failed(ConnectionError("gone"))  # as a failed command leaves it
            await counters.close_connection(IP)  # Redis is not asked in the retry pause
            assert state.unclosed[IP] == 1
            assert await counters.open_connection(IP, 1) == "local"
            clock[0] += 10.0
            heartbeat = asyncio.get_running_loop().create_task(counters.run())
            deadline = asyncio.get_running_loop().time() + 10
            while state.unclosed:
                assert asyncio.get_running_loop().time() < deadline, "never taken back"
                await asyncio.sleep(0.01)  # polling a bounded wait
            heartbeat.cancel()
            assert await counters.open_connection(IP, 1) == "shared"  # the slot is free again
        finally:
            await counters.close()

    run(go)


# --- the same decisions as the per-process counters -------------------------------------

DIFF_CFG = dataclasses.replace(
    RateLimitsConfig(
        login_messages_per_hour=6, login_recipients_per_message=3, ip_recipients_per_hour=12,
        service_messages_per_hour=30, ip_messages_per_hour=4, shadow=("ip_messages_per_hour",),
        breaker_recipients_per_hour=9, auth_delay_after=2, auth_refuse_after=5,
        auth_login_refuse_after=4, auth_parallel_per_client=2, auth_parallel_per_login=2,
    ),
    exempt_networks=(ipaddress.ip_network("198.51.100.0/24"),),
)  # fmt: skip
Event = tuple[object, ...]


def script_of_events(seed: int, n: int) -> list[Event]:
    """A seeded sequence of what sessions do: messages (every RCPT, DATA, then the record),
    AUTH attempts begun and ended in any order, connections to AUTH services."""
    rng = random.Random(seed)
    logins = ["alice", "Bob", "bob", "carol"]
    ips = ["192.0.2.7", "192.0.2.8", "198.51.100.1", "2001:db8::1", "2001:db8::2"]
    events: list[Event] = []
    for _ in range(n):
        kind = rng.choice(["message"] * 4 + ["begin"] * 3 + ["end"] * 2 + ["connect"])
        if kind == "message":
            events.append(("message", rng.choice(["submission", "submissions"]),
                           rng.choice(logins), rng.choice(ips), rng.randint(1, 4)))  # fmt: skip
        elif kind == "begin":
            events.append(("begin", rng.choice(ips), rng.choice(logins)))
        elif kind == "end":
            events.append(("end", rng.random(), rng.choice([(True, True), (False, True),
                                                             (False, False)])))  # fmt: skip
        else:
            events.append(("connect", rng.choice(ips)))
    return events


async def play(events: list[Event], pick: Callable[[int], Counters],
               before_each: Callable[[], None] = lambda: None
               ) -> tuple[list[object], int]:  # fmt: skip
    """Each event through `pick(i)`: what each one decided, in a comparable form, and how many
    checks were answered without waiting."""
    outcomes: list[object] = []
    answered_now = 0
    open_attempts: list[tuple[Counters, str, str, AuthDecision]] = []
    for i, event in enumerate(events):
        before_each()
        counters = pick(i)
        if event[0] == "message":
            _, service, login, ip, nrcpt = event
            assert isinstance(service, str) and isinstance(login, str) and isinstance(ip, str)
            assert isinstance(nrcpt, int)
            try:
                # As the session does: answered at once when the counts allow (decides_now),
                # else after asking Redis.
                for n in range(1, nrcpt + 1):
                    if counters.decides_now(service, login, ip):
                        answered_now += 1
                        counters.check_recipient_now(service=service, login=login, ip=ip,
                                                     rcpt_in_message=n)  # fmt: skip
                    else:
                        await counters.check_recipient(service=service, login=login, ip=ip,
                                                       rcpt_in_message=n)  # fmt: skip
                if counters.decides_now(service, login, ip):
                    answered_now += 1
                    counters.check_message_now(service=service, login=login, ip=ip, nrcpt=nrcpt)
                else:
                    await counters.check_message(service=service, login=login, ip=ip,
                                                 nrcpt=nrcpt)  # fmt: skip
            except Rejected as e:
                outcomes.append(("refused", e.reply, e.reason))
                continue
            trip = await counters.record_message(service=service, login=login, ip=ip,
                                                 nrcpt=nrcpt)  # fmt: skip
            outcomes.append(("sent", trip and (trip.login, trip.metric, trip.count,
                                               trip.threshold)))  # fmt: skip
        elif event[0] == "begin":
            _, ip, login = event
            assert isinstance(ip, str) and isinstance(login, str)
            d = await counters.begin_attempt(ip, login)
            outcomes.append(("auth", d.action, d.delay, d.reply, d.reason))
            if not d.is_refused:
                open_attempts.append((counters, ip, login, d))
        elif event[0] == "end":
            _, where, how = event
            assert isinstance(where, float) and isinstance(how, tuple)
            if not open_attempts:
                continue
            began, ip, login, d = open_attempts.pop(int(where * len(open_attempts)))
            await began.end_attempt(ip, login, d, succeeded=how[0], verified=how[1])
            if began.shared is not None:
                await began.shared.check()  # a PING: what it sent before has run in Redis
        else:
            _, ip = event
            assert isinstance(ip, str)
            outcomes.append(("connect", (await counters.admit(ip, 1000, lockout=True))[1]))
    return outcomes, answered_now


def per_process(events: list[Event]) -> list[object]:
    alone = Counters(Limits(DIFF_CFG), AuthGuard(DIFF_CFG), None)
    return run(lambda: play(events, lambda i: alone))[0]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_one_process_on_redis_decides_as_the_per_process_counters(prefix: str, seed: int) -> None:
    """Counts kept from the scripts' answers (a clock that never moves: they stay fresh) answer
    as the per-process counters do: this process's own records always update them."""
    events = script_of_events(seed, 150)

    async def go() -> tuple[list[object], int]:
        one = Counters(Limits(DIFF_CFG), AuthGuard(DIFF_CFG),
                       SharedState(REDIS, prefix, now=lambda: 1000.0))  # fmt: skip
        try:
            return await play(events, lambda i: one)
        finally:
            await one.close()

    shared, answered_now = run(go)
    assert shared == per_process(events)
    assert answered_now >= 50  # many checks were answered from kept counts
    assert any(o[0] == "refused" for o in shared if isinstance(o, tuple))  # the limits bit
    assert any(o[0] == "auth" and o[1] != "allow" for o in shared if isinstance(o, tuple))


@pytest.mark.parametrize("seed", [4, 5])
def test_three_processes_on_redis_decide_as_one_per_process_counter(prefix: str, seed: int) -> None:
    """Events spread over three processes (kept counts too old to answer the next event: its
    first check asks Redis) decide as one process counting alone would: the cluster is one
    counter."""
    events = script_of_events(seed, 150)
    clock = [1000.0]

    def tick() -> None:
        clock[0] += FRESH  # kept counts are never fresh

    async def go() -> tuple[list[object], int]:
        nodes = [Counters(Limits(DIFF_CFG), AuthGuard(DIFF_CFG),
                          SharedState(REDIS, prefix, now=lambda: clock[0]))
                 for _ in range(3)]  # fmt: skip
        try:
            return await play(events, lambda i: nodes[i % 3], tick)
        finally:
            for n in nodes:
                await n.close()

    assert run(go)[0] == per_process(events)


# --- the connection: TLS, a password, a database ------------------------------------------


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A redis-server of this test's own speaking TLS only (a certificate for localhost from a
    test CA) and asking for a password; (its port, the CA file). Stopped by its PID."""
    ca = TestCA(tmp_path / "ca")
    issued = ca.issue("localhost")
    port = free_port()
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen(
        [server, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(issued.cert), "--tls-key-file", str(issued.key),
         "--tls-ca-cert-file", str(ca.cert_path), "--tls-auth-clients", "no",
         "--requirepass", "s3cret", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: accepts(port), timeout=10, what="redis-server on its TLS port")
        yield port, ca.cert_path
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_rediss_with_a_password_and_a_database(tls_redis: tuple[int, Path]) -> None:
    port, ca = tls_redis

    async def go() -> None:
        good = SharedState(f"rediss://:s3cret@localhost:{port}/2?ssl_ca_certs={ca}", "t:")
        untrusted = SharedState(f"rediss://:s3cret@localhost:{port}/2", "t:")  # system CAs
        wrong = SharedState(f"rediss://:nope@localhost:{port}/2?ssl_ca_certs={ca}", "t:")
        try:
            assert await good.rate("-", ["n"], [3], window=3600.0, buckets=60) == ("", [3])
            with pytest.raises(StateUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusted.check()
            with pytest.raises(StateUnavailable, match="WRONGPASS"):
                await wrong.check()
        finally:
            for state in (good, untrusted, wrong):
                await state.close()

    run(go)
    client = redis.Redis(host="localhost", port=port, db=2, password="s3cret", ssl=True,
                         ssl_ca_certs=str(ca))  # fmt: skip
    try:  # the count is in database 2, where the URL said
        assert client.exists("t:rate:n") == 1
    finally:
        client.close()

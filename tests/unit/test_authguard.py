"""AuthGuard: failed-AUTH counting, growing delays, 454 4.7.0 refusal, no cross-login resets."""

from __future__ import annotations

import ipaddress
import logging

import pytest

from mailgate import replies
from mailgate.limits import AuthDecision, AuthGuard
from tests.unit.test_limits import Clock, ratelimits

IP = "192.0.2.7"


def guard(clock: Clock, **values: object) -> AuthGuard:
    defaults: dict[str, object] = {
        "auth_window": 900.0,
        "auth_delay_after": 3,
        "auth_base_delay": 1.0,
        "auth_max_delay": 8.0,
        "auth_refuse_after": 10,
        "auth_login_refuse_after": 6,
    }
    return AuthGuard(ratelimits(**{**defaults, **values}), now=clock)


def fail(g: AuthGuard, times: int, ip: str = IP, login: str = "alice") -> None:
    for _ in range(times):
        g.record_failure(ip, login)


def test_delays_grow_then_the_client_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    g = guard(Clock())
    delays = []
    # A different login on every try, as a password sprayer does: only the client counts.
    for n in range(10):
        decision = g.before_attempt(IP, f"user{n}")
        assert decision.action in ("allow", "delay")
        delays.append(decision.delay)
        g.record_failure(IP, f"user{n}")
    assert delays == [0.0, 0.0, 0.0, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    with caplog.at_level(logging.WARNING, logger="mailgate.limits.authguard"):
        decision = g.before_attempt(IP, "someone")
    assert decision == AuthDecision(
        "refuse", reply=replies.TOO_MANY_AUTH_FAILURES, reason="client=192.0.2.7 failures=10"
    )
    assert decision.is_refused and decision.refuse
    assert decision.reply is not None and decision.reply.line() == (
        "454 4.7.0 Too many authentication failures, try again later"
    )
    assert [r.getMessage() for r in caplog.records] == [
        "auth refused too_many_failures client=192.0.2.7 failures=10"
    ]
    # Another client is not affected.
    assert g.before_attempt("192.0.2.8", "someone").action == "allow"


def test_the_same_answer_whether_or_not_the_login_exists() -> None:
    # The guard never learns whether a login exists: equal histories give equal decisions.
    g = guard(Clock())
    fail(g, 4, login="alice")  # a real account
    fail(g, 4, ip="198.51.100.1", login="no-such-user")
    assert (
        g.before_attempt(IP, "alice").delay
        == g.before_attempt("198.51.100.1", "no-such-user").delay
        == 2.0
    )
    fail(g, 2, login="alice")
    fail(g, 2, ip="198.51.100.1", login="no-such-user")
    refused = [g.before_attempt(IP, "alice"), g.before_attempt("198.51.100.1", "no-such-user")]
    assert [d.reply for d in refused] == [replies.TOO_MANY_AUTH_FAILURES] * 2


def test_login_is_locked_against_attempts_from_many_clients() -> None:
    g = guard(Clock())
    for n in range(6):
        g.record_failure(f"203.0.113.{n}", "Alice")
    decision = g.before_attempt("198.51.100.50", "alice")
    assert decision.is_refused
    assert decision.reason == "login=alice failures=6"
    assert g.before_attempt("198.51.100.50", "bob").action == "allow"


def test_a_client_that_logged_in_before_is_not_locked_out_by_others() -> None:
    clock = Clock()
    g = guard(clock, auth_trust_period=86400.0)
    g.record_success(IP, "alice")  # alice's usual client
    for n in range(6):
        g.record_failure(f"203.0.113.{n}", "alice")
    assert g.before_attempt("198.51.100.50", "alice").is_refused
    assert g.before_attempt(IP, "alice").action == "allow"
    clock.advance(86400)
    # Trust has lapsed (and the attacker's failures too, so alice is not locked either way).
    assert g.before_attempt(IP, "alice").action == "allow"
    for n in range(6):
        g.record_failure(f"203.0.113.{n}", "alice")
    assert g.before_attempt(IP, "alice").is_refused


def test_a_success_does_not_reset_other_logins_counters() -> None:
    g = guard(Clock(), auth_login_refuse_after=5)
    fail(g, 5, login="bob")  # bob guessed from IP: IP has 5, bob has 5
    fail(g, 2, login="alice")  # alice's own typos
    g.record_success(IP, "alice")
    # alice's typos are forgotten, bob's failures are not: from this client ...
    assert g.before_attempt(IP, "carol").delay == 4.0  # 5 client failures: 1 * 2**2
    # ... nor for bob from anywhere.
    assert g.before_attempt("198.51.100.1", "bob").is_refused
    snap = g.snapshot()
    assert snap["clients"] == [{"key": IP, "failures": 5, "state": "delayed"}]
    assert snap["logins"] == [{"key": "bob", "failures": 5, "state": "refused"}]


def test_a_success_forgets_the_users_own_failures_only_from_that_client() -> None:
    g = guard(Clock(), auth_login_refuse_after=5)
    fail(g, 3, login="alice")
    fail(g, 2, ip="203.0.113.9", login="alice")  # someone else trying alice
    g.record_success(IP, "alice")
    assert g.snapshot()["logins"] == [{"key": "alice", "failures": 2, "state": "counting"}]
    assert g.snapshot()["clients"] == [{"key": "203.0.113.9", "failures": 2, "state": "counting"}]


def test_failures_expire_after_the_window() -> None:
    clock = Clock()
    g = guard(clock)
    fail(g, 10)
    assert g.before_attempt(IP, "alice").is_refused
    clock.advance(899)
    assert g.before_attempt(IP, "alice").is_refused
    clock.advance(1)
    assert g.before_attempt(IP, "alice") == AuthDecision("allow")
    assert g.snapshot() == {"window_seconds": 900.0, "clients": [], "logins": []}


def test_ipv6_clients_are_counted_by_network() -> None:
    g = guard(Clock(), auth_login_refuse_after=100)
    for n in range(10):
        g.record_failure(f"2001:db8:5:6::{n + 1:x}", f"user{n}")
    decision = g.before_attempt("2001:db8:5:6:ffff::1", "other")
    assert decision.is_refused
    assert decision.reason == "client=2001:db8:5:6::/64 failures=10"
    assert g.before_attempt("2001:db8:5:7::1", "other").action == "allow"


def test_exempt_clients_are_only_counted_per_login() -> None:
    g = guard(Clock(), exempt_networks=(ipaddress.ip_network("10.0.0.0/8"),))
    for n in range(20):
        g.record_failure("10.0.0.5", f"user{n}")  # webmail: many users' typos
    assert g.before_attempt("10.0.0.5", "user99").action == "allow"
    fail(g, 6, ip="10.0.0.5", login="alice")
    assert g.before_attempt("10.0.0.5", "alice").is_refused


def test_memory_is_bounded() -> None:
    g = AuthGuard(ratelimits(), now=Clock(), max_keys=5)
    for n in range(50):
        g.record_failure(f"192.0.2.{n}", f"user{n}")
        g.record_success(f"198.51.100.{n}", f"user{n}")
    snap = g.snapshot(top=100)
    assert len(snap["clients"]) == 5 and len(snap["logins"]) == 5
    assert snap["clients"][0] == {"key": "192.0.2.45", "failures": 1, "state": "counting"}


def test_a_refused_client_is_known_at_connect_time() -> None:
    clock = Clock()
    g = guard(clock, exempt_networks=(ipaddress.ip_network("198.51.100.0/24"),))
    fail(g, 9)
    assert not g.is_client_refused(IP)
    fail(g, 1)
    assert g.is_client_refused(IP)
    assert not g.is_client_refused("192.0.2.8")  # another client
    fail(g, 10, ip="198.51.100.5", login="bob")
    assert not g.is_client_refused("198.51.100.5")  # exempt networks are never locked out
    clock.advance(901)
    assert not g.is_client_refused(IP)  # the window passed


# --- issue #11, class 6: counted before the hash, a cap on attempts in flight ---------------


def test_an_attempt_counts_as_a_failure_from_the_moment_it_begins() -> None:
    g = guard(Clock(), auth_parallel_per_client=100, auth_parallel_per_login=100)
    # A burst: ten attempts begin before any hash has finished (no end_attempt yet).
    actions = [g.begin_attempt(IP, f"user{n}").action for n in range(10)]
    assert actions == ["allow"] * 3 + ["delay"] * 7
    # The right password in the same burst finds the client locked, not "0 failures".
    decision = g.begin_attempt(IP, "alice")
    assert decision.reply == replies.TOO_MANY_AUTH_FAILURES
    assert g.is_client_refused(IP)


def test_a_success_takes_back_only_its_own_count() -> None:
    g = guard(Clock(), auth_parallel_per_client=100)
    for n in range(3):
        assert not g.begin_attempt(IP, f"user{n}").is_refused
    assert g.begin_attempt(IP, "alice").action == "delay"  # 3 failures counted so far
    g.end_attempt(IP, "alice", succeeded=True)
    for n in range(3):
        g.end_attempt(IP, f"user{n}", succeeded=False)
    assert g.snapshot()["clients"] == [{"key": IP, "failures": 3, "state": "delayed"}]


def test_attempts_beyond_the_parallel_cap_are_refused_and_counted() -> None:
    g = guard(Clock(), auth_parallel_per_client=2, auth_refuse_after=100,
              auth_login_refuse_after=100, auth_delay_after=100)  # fmt: skip
    assert [g.begin_attempt(IP, "alice").action for _ in range(2)] == ["allow", "allow"]
    busy = g.begin_attempt(IP, "bob")
    assert busy.reply == replies.TOO_MANY_AUTH_IN_PROGRESS
    assert busy.reply.line() == (
        "454 4.7.0 Too many authentication attempts in progress, try again later"
    )
    assert g.snapshot()["clients"][0]["failures"] == 3  # the refused one counts too
    g.end_attempt(IP, "alice", succeeded=False)  # a slot frees up
    assert g.begin_attempt(IP, "bob").action == "allow"
    # Another client has its own slots.
    assert g.begin_attempt("192.0.2.8", "carol").action == "allow"


def test_the_login_cap_spares_trusted_clients_and_exempt_networks_skip_the_client_cap() -> None:
    g = guard(Clock(), auth_parallel_per_login=2, auth_parallel_per_client=1,
              auth_refuse_after=100, auth_login_refuse_after=100, auth_delay_after=100,
              exempt_networks=(ipaddress.ip_network("10.0.0.0/8"),))  # fmt: skip
    g.record_success(IP, "alice")  # alice's usual client
    for n in range(2):
        assert g.begin_attempt(f"203.0.113.{n}", "alice").action == "allow"
    refused = g.begin_attempt("203.0.113.9", "alice")
    assert refused.reply == replies.TOO_MANY_AUTH_IN_PROGRESS
    assert refused.reason == "login=alice in_flight"
    assert g.begin_attempt(IP, "alice").action == "allow"  # trusted: not capped per login
    # Webmail in an exempt network: many of its users at once, no per-client cap.
    assert [g.begin_attempt("10.0.0.5", f"u{n}").action for n in range(3)] == ["allow"] * 3


def test_an_attempt_the_backend_could_not_check_is_taken_back() -> None:
    g = guard(Clock(), auth_parallel_per_client=100)
    for _ in range(3):
        assert not g.begin_attempt(IP, "alice").is_refused
        g.end_attempt(IP, "alice", succeeded=False, verified=False)  # 454: backend down
    assert g.snapshot() == {"window_seconds": 900.0, "clients": [], "logins": []}
    assert g.begin_attempt(IP, "alice").action == "allow"

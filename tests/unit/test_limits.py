"""Rate limits per service, login and network: 450 4.7.1, sliding windows, shadow, breaker."""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mailgate import config
from mailgate.config import RateLimitsConfig, ServiceRateLimits
from mailgate.errors import ConfigError, Rejected
from mailgate.limits import BreakerTrip, Limits, MemoryBackend, network_key, read_snapshot

# --- shared with the other rate-limit tests: a hand-moved clock and a config builder ---
WALL = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


class Clock:
    """A monotonic clock the test moves by hand. It starts on a bucket boundary (a multiple
    of 60 s), so an event leaves a one-hour window exactly 3600 s after it happened."""

    def __init__(self, start: float = 1_000_020.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        assert seconds >= 0
        self.t += seconds


def wall() -> datetime:
    return WALL


def ratelimits(**values: Any) -> RateLimitsConfig:
    """[ratelimits] with every limit off and no breaker, then `values`."""
    base = RateLimitsConfig(breaker_recipients_per_hour=0)
    return replace(base, **values)


SUB = "submission"
IP = "192.0.2.7"


def make(clock: Clock, **values: object) -> Limits:
    return Limits(ratelimits(**values), now=clock, wall=wall)


def send(
    limits: Limits, nrcpt: int = 1, *, login: str | None = "alice", ip: str = IP, service: str = SUB
) -> BreakerTrip | None:
    """One message as the session runs it: every RCPT checked, DATA checked, then recorded."""
    for n in range(1, nrcpt + 1):
        limits.check_recipient(service=service, login=login, ip=ip, rcpt_in_message=n)
    limits.check_message(service=service, login=login, ip=ip, nrcpt=nrcpt)
    return limits.record_message(service=service, login=login, ip=ip, nrcpt=nrcpt)


def refusal(
    limits: Limits,
    rcpt_in_message: int = 1,
    *,
    login: str | None = "alice",
    ip: str = IP,
    service: str = SUB,
) -> Rejected:
    with pytest.raises(Rejected) as info:
        limits.check_recipient(service=service, login=login, ip=ip, rcpt_in_message=rcpt_in_message)
    return info.value


def test_login_messages_per_hour_refuses_with_450_and_slides() -> None:
    clock = Clock()
    limits = make(clock, login_messages_per_hour=2)
    send(limits)
    clock.advance(1800)
    send(limits)
    e = refusal(limits)
    assert (e.reply.code, e.reply.status) == (450, "4.7.1")
    assert e.reply.text == (
        "Too many messages per hour from this account (limit 2), please try again later"
    )
    assert e.reason == (
        "ratelimit limited key=login:alice limit=login_messages_per_hour max=2 count=3 "
        "service=submission"
    )
    # The first message leaves the window an hour after it was sent, the second does not.
    clock.advance(1799)
    refusal(limits)
    clock.advance(1)
    send(limits)
    refusal(limits)


def test_login_recipients_per_hour_counts_this_message_recipients() -> None:
    clock = Clock()
    limits = make(clock, login_recipients_per_hour=5)
    send(limits, 4)
    limits.check_recipient(service=SUB, login="alice", ip=IP, rcpt_in_message=1)
    e = refusal(limits, 2)
    assert e.reply.line() == (
        "450 4.7.1 Too many recipients per hour from this account (limit 5), please try again later"
    )
    # Another login is not affected.
    send(limits, 5, login="bob")


def test_recipients_per_message() -> None:
    limits = make(Clock(), login_recipients_per_message=3)
    send(limits, 3)
    e = refusal(limits, 4)
    assert e.reply.line() == (
        "450 4.7.1 Too many recipients in one message for this account (limit 3); "
        "send the rest in another message"
    )
    with pytest.raises(Rejected) as info:
        limits.check_message(service=SUB, login="alice", ip=IP, nrcpt=4)
    assert info.value.reply.status == "4.7.1"


def test_zero_means_no_limit() -> None:
    limits = make(Clock())
    for _ in range(50):
        send(limits, 100)


def test_logins_compare_case_insensitively() -> None:
    limits = make(Clock(), login_messages_per_hour=1)
    send(limits, login="Alice")
    refusal(limits, login="aLICE")


def test_ip_limits_count_the_ipv4_slash_24() -> None:
    limits = make(Clock(), ip_messages_per_hour=2)
    send(limits, login=None, ip="192.0.2.1")
    send(limits, login=None, ip="192.0.2.254")
    e = refusal(limits, login=None, ip="192.0.2.77")
    assert e.reply.text == (
        "Too many messages per hour from this network (limit 2), please try again later"
    )
    assert "key=ip:192.0.2.0/24 " in e.reason
    send(limits, login=None, ip="192.0.3.1")  # the next /24 is separate
    # A dual-stack listener reports IPv4 clients as IPv4-mapped addresses: same network.
    refusal(limits, login=None, ip="::ffff:192.0.2.9")


def test_ip_limits_count_the_ipv6_slash_64() -> None:
    limits = make(Clock(), ip_recipients_per_hour=3)
    send(limits, 2, login=None, ip="2001:db8:1:2::1")
    send(limits, 1, login=None, ip="2001:db8:1:2:ffff::9")
    e = refusal(limits, login=None, ip="2001:db8:1:2::abcd")
    assert "key=ip:2001:db8:1:2::/64 " in e.reason
    send(limits, 3, login=None, ip="2001:db8:1:3::1")


def test_network_keys() -> None:
    assert network_key("192.0.2.200", 24, 64) == "192.0.2.0/24"
    assert network_key("192.0.2.200", 32, 64) == "192.0.2.200"
    assert network_key("10.1.2.3", 16, 64) == "10.1.0.0/16"
    assert network_key("2001:db8:a:b:c:d:e:f", 24, 48) == "2001:db8:a::/48"
    assert network_key("[2001:db8::1]", 24, 128) == "2001:db8::1"
    assert network_key("fe80::1%eth0", 24, 64) == "fe80::/64"
    assert network_key("::ffff:198.51.100.3", 24, 64) == "198.51.100.0/24"
    assert network_key("not-an-ip", 24, 64) == "not-an-ip"


def test_service_limit_counts_every_client_of_one_listener() -> None:
    limits = make(Clock(), service_messages_per_hour=2)
    send(limits, login="alice", ip="192.0.2.1")
    send(limits, login="bob", ip="198.51.100.1")
    e = refusal(limits, login="carol", ip="203.0.113.1")
    assert e.reply.text == (
        "Too many messages per hour from this service (limit 2), please try again later"
    )
    send(limits, login="carol", ip="203.0.113.1", service="submissions")


def test_per_service_overrides_win_over_the_defaults() -> None:
    clock = Clock()
    limits = make(
        clock,
        ip_messages_per_hour=1,
        smarthost=ServiceRateLimits(ip_messages_per_hour=3),
        submissions=ServiceRateLimits(ip_messages_per_hour=0),
    )
    assert limits.limit("smarthost", "ip_messages_per_hour") == 3
    assert limits.limit("submission", "ip_messages_per_hour") == 1
    assert limits.limit("submissions", "ip_messages_per_hour") == 0
    for _ in range(3):
        send(limits, login=None, service="smarthost")
    refusal(limits, login=None, service="smarthost")
    # The counter is per network, not per service: submission's lower limit is already passed.
    refusal(limits, login="alice", service="submission")
    send(limits, login="alice", service="submissions")


def test_shadow_mode_only_logs(caplog: pytest.LogCaptureFixture) -> None:
    limits = make(Clock(), login_messages_per_hour=1, shadow=("login_messages_per_hour",))
    send(limits)
    with caplog.at_level(logging.INFO, logger="mailgate.limits.rate"):
        send(limits)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "ratelimit shadow would_limit key=login:alice limit=login_messages_per_hour max=1 "
        "count=2 service=submission",  # at RCPT
        "ratelimit shadow would_limit key=login:alice limit=login_messages_per_hour max=1 "
        "count=2 service=submission",  # at DATA
    ]
    hits = limits.snapshot()["limits"]["login_messages_per_hour"]["services"][SUB]
    assert hits == {"max": 1, "shadow": True, "refused": 0, "would_refuse": 2}


def test_shadow_is_per_limit_and_per_service() -> None:
    limits = make(
        Clock(),
        login_messages_per_hour=1,
        ip_messages_per_hour=1,
        shadow=("login_messages_per_hour",),
        smarthost=ServiceRateLimits(shadow=("ip_messages_per_hour",)),
    )
    send(limits)
    # login is shadowed, ip is not: the ip limit refuses.
    e = refusal(limits)
    assert "limit=ip_messages_per_hour" in e.reason
    # On the smart host only the ip limit is shadowed (and there is no login).
    send(limits, login=None, service="smarthost")
    assert limits.is_shadow("smarthost", "ip_messages_per_hour")
    assert not limits.is_shadow("smarthost", "login_messages_per_hour")


def test_exempt_networks_are_counted_but_never_refused() -> None:
    limits = make(
        Clock(),
        ip_messages_per_hour=1,
        login_messages_per_hour=1,
        exempt_networks=(ipaddress.ip_network("10.0.0.0/8"),),
    )
    for _ in range(3):
        send(limits, ip="10.1.2.3")
    top = limits.snapshot()["limits"]["ip_messages_per_hour"]["top"]
    assert top == [{"key": "10.1.2.0/24", "count": 3}]
    refusal(limits, ip="192.0.2.1")  # the login's count applies outside the exemption


def test_check_message_refuses_when_other_sessions_used_the_allowance() -> None:
    limits = make(Clock(), login_recipients_per_hour=10)
    # Two sessions pass their RCPT checks, then the first one's message is recorded.
    for n in range(1, 7):
        limits.check_recipient(service=SUB, login="alice", ip=IP, rcpt_in_message=n)
    for n in range(1, 7):
        limits.check_recipient(service=SUB, login="alice", ip="198.51.100.1", rcpt_in_message=n)
    limits.check_message(service=SUB, login="alice", ip=IP, nrcpt=6)
    limits.record_message(service=SUB, login="alice", ip=IP, nrcpt=6)
    with pytest.raises(Rejected) as info:
        limits.check_message(service=SUB, login="alice", ip="198.51.100.1", nrcpt=6)
    assert info.value.reply.line() == (
        "450 4.7.1 Too many recipients per hour from this account (limit 10), "
        "please try again later"
    )


def test_the_most_specific_enforced_limit_is_reported() -> None:
    limits = make(
        Clock(), service_messages_per_hour=1, ip_messages_per_hour=1, login_messages_per_hour=1
    )
    send(limits)
    assert "limit=login_messages_per_hour" in refusal(limits).reason
    assert "limit=ip_messages_per_hour" in refusal(limits, login="bob").reason
    assert "limit=service_messages_per_hour" in refusal(limits, login=None, ip="::1").reason


def test_breaker_trips_once_and_blocks_the_login(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    limits = make(clock, breaker_recipients_per_hour=10)
    assert send(limits, 6) is None
    clock.advance(60)
    with caplog.at_level(logging.CRITICAL, logger="mailgate.limits.rate"):
        trip = send(limits, 5, login="Alice")
    assert trip == BreakerTrip(
        login="Alice", metric="recipients_per_hour", count=11, threshold=10, at=WALL
    )
    assert trip.reason == "recipients_per_hour=11>10"
    assert [r.getMessage() for r in caplog.records] == [
        "ALERT ratelimit breaker tripped login=Alice reason=recipients_per_hour=11>10"
    ]
    # Reported once: the same session may still record a message in flight.
    assert limits.record_message(service=SUB, login="alice", ip=IP, nrcpt=1) is None
    e = refusal(limits)
    assert e.reply.line() == (
        "450 4.7.1 Sending from this account is suspended, contact the postmaster"
    )
    send(limits, 1, login="bob")  # other logins carry on
    snap = limits.snapshot()["breaker"]
    assert snap == {
        "recipients_per_hour": 10,
        "messages_per_hour": 0,
        "refused": 1,
        "tripped": [
            {
                "login": "Alice",
                "reason": "recipients_per_hour=11>10",
                "at": WALL.isoformat(),
                "active": True,
            }
        ],
    }
    # Once the hour has passed the login is re-armed: allowed, and it can trip again.
    clock.advance(3600)
    assert send(limits, 10) is None
    trip2 = send(limits, 1)
    assert trip2 is not None and trip2.count == 11
    assert [t["active"] for t in limits.snapshot()["breaker"]["tripped"]] == [False, True]


def test_breaker_on_messages_and_never_without_login() -> None:
    limits = make(Clock(), breaker_messages_per_hour=2)
    assert send(limits, login=None) is None
    assert send(limits, login=None) is None
    assert send(limits, login=None) is None  # the smart host has no login to suspend
    assert send(limits) is None
    assert send(limits) is None
    trip = send(limits)
    assert trip is not None and (trip.metric, trip.count, trip.threshold) == (
        "messages_per_hour",
        3,
        2,
    )


def test_breaker_counts_mail_from_exempt_networks() -> None:
    limits = make(
        Clock(),
        breaker_recipients_per_hour=3,
        exempt_networks=(ipaddress.ip_network("192.0.2.0/24"),),
    )
    assert send(limits, 3) is None
    assert send(limits, 1) is not None


def test_snapshot_lists_top_keys_and_limits() -> None:
    clock = Clock()
    limits = make(
        clock,
        login_recipients_per_hour=100,
        smarthost=ServiceRateLimits(login_recipients_per_hour=0),
    )
    send(limits, 3, login="alice")
    send(limits, 7, login="bob", ip="198.51.100.9")
    send(limits, 3, login="carol")
    send(limits, 1, login=None, service="smarthost", ip="10.0.0.1")
    snap = limits.snapshot(top=2)
    assert snap["version"] == 1
    assert snap["written_at"] == WALL.isoformat()
    assert snap["window_seconds"] == 3600.0
    entry = snap["limits"]["login_recipients_per_hour"]
    assert entry["top"] == [{"key": "bob", "count": 7}, {"key": "alice", "count": 3}]
    assert entry["services"] == {
        "submission": {"max": 100, "shadow": False, "refused": 0, "would_refuse": 0},
        "submissions": {"max": 100, "shadow": False, "refused": 0, "would_refuse": 0},
        "smarthost": {"max": 0, "shadow": False, "refused": 0, "would_refuse": 0},
    }
    assert snap["limits"]["ip_messages_per_hour"]["top"] == [
        {"key": "192.0.2.0/24", "count": 2},
        {"key": "10.0.0.0/24", "count": 1},
    ]
    assert snap["limits"]["service_recipients_per_hour"]["top"] == [
        {"key": "submission", "count": 13},
        {"key": "smarthost", "count": 1},
    ]
    assert "top" not in snap["limits"]["login_recipients_per_message"]
    assert list(snap["limits"]) == list(config.RATE_LIMIT_NAMES)
    # An hour later the counters are empty and pruned.
    clock.advance(3601)
    assert limits.snapshot()["limits"]["login_recipients_per_hour"]["top"] == []
    assert isinstance(limits.backend, MemoryBackend) and len(limits.backend) == 0


def test_write_snapshot_is_atomic_and_private(tmp_path: Path) -> None:
    limits = make(Clock(), login_messages_per_hour=5)
    send(limits)
    path = tmp_path / "limits.json"
    path.write_text("old")
    limits.write_snapshot(
        path, extra={"auth": {"window_seconds": 900.0, "clients": [], "logins": []}}
    )
    assert os.listdir(tmp_path) == ["limits.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = read_snapshot(path)
    assert data["limits"]["login_messages_per_hour"]["top"] == [{"key": "alice", "count": 1}]
    assert data["auth"]["window_seconds"] == 900.0


def test_read_snapshot_rejects_other_files(tmp_path: Path) -> None:
    path = tmp_path / "limits.json"
    path.write_text('{"version": 7}')
    with pytest.raises(ValueError, match="not a mailgate rate-limit snapshot"):
        read_snapshot(path)


def test_config_ratelimits_section(tmp_path: Path) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text(
        'hostname = "mail.test"\n[smarthost]\nlisten = ["127.0.0.1:10025"]\n'
        '[ratelimits]\nlogin_recipients_per_hour = 500\nshadow = ["ip_messages_per_hour"]\n'
        'ipv6_prefix = 56\nexempt_networks = ["10.0.0.0/8"]\n'
        "[ratelimits.smarthost]\nip_messages_per_hour = 5000\nshadow = []\n"
    )
    cfg = config.load(path, check_files=False).ratelimits
    assert cfg.login_recipients_per_hour == 500
    assert cfg.shadow == ("ip_messages_per_hour",)
    assert cfg.ipv6_prefix == 56
    assert cfg.exempt_networks == (ipaddress.ip_network("10.0.0.0/8"),)
    assert cfg.smarthost == ServiceRateLimits(ip_messages_per_hour=5000, shadow=())
    assert cfg.submission == ServiceRateLimits()
    assert cfg.breaker_recipients_per_hour == 1000


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "[ratelimits]\nlogin_messages_per_hour = -1\n",
            "ratelimits.login_messages_per_hour: expected a non-negative integer",
        ),
        ('[ratelimits]\nshadow = ["nope"]\n', "ratelimits.shadow: 'nope' is not a rate limit"),
        ("[ratelimits]\nipv4_prefix = 33\n", "ratelimits.ipv4_prefix: expected a prefix length"),
        ("[ratelimits.smarthost]\nfoo = 1\n", "ratelimits.smarthost.foo: unknown key"),
        (
            "[ratelimits.smarthost]\nip_messages_per_hour = true\n",
            "ratelimits.smarthost.ip_messages_per_hour: expected a non-negative integer",
        ),
        ("[ratelimits]\nsmarthost = 3\n", "ratelimits.smarthost: expected a table"),
        ("[ratelimits]\nauth_window = 0\n", "ratelimits.auth_window: expected a positive"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        config.load(path, check_files=False)

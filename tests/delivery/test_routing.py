"""Delivery over real loopback SMTP and DNS: routing (MX, A fallback, null MX, NXDOMAIN, relay)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.delivery.conftest import (
    HOSTNAME,
    SENDER,
    SENDER_DOMAIN,
    Harness,
    SinkFactory,
    delivery_status,
    make_message,
    route,
)
from tests.support.dnsserver import DnsServer
from tests.support.smtpsink import SmtpSink


def test_success_via_mx(
    harness: Harness, dns: DnsServer, sinks: SinkFactory, caplog: pytest.LogCaptureFixture
) -> None:
    sink = sinks()
    route(dns, "dest.test", sink)
    message = make_message()
    qid = harness.enqueue(["bob@dest.test", "carol@dest.test"], message=message)

    async def scenario() -> None:
        async with harness.running():
            await harness.until_gone(qid)

    with caplog.at_level(logging.INFO, logger="mailgate.deliver"):
        asyncio.run(scenario())
    [t] = sink.accepted()
    assert t.mail_from == SENDER
    # Several recipients of one domain go in one transaction.
    assert t.rcpt_to == ("bob@dest.test", "carol@dest.test")
    assert t.message == message
    assert t.helo == HOSTNAME
    assert not t.tls
    lines = [r.getMessage() for r in caplog.records if "to=<bob@dest.test>" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith(f"qid={qid} to=<bob@dest.test> relay=mx.dest.test[{sink.host}]:25 ")
    assert " tls=no verified=no policy=none delay=" in lines[0]
    assert lines[0].endswith(' status=sent reply="250 2.0.0 Ok: queued"')


def dead_address() -> str:
    """A loopback address where nothing listens on port 25 (connections are refused)."""
    import socket

    for n in range(200, 254):
        host = f"127.0.0.{n}"
        with socket.socket() as s:
            try:
                s.bind((host, 25))
            except OSError:
                continue
            return host
    raise AssertionError("no free loopback address")


def test_no_mx_falls_back_to_a(harness: Harness, dns: DnsServer, sinks: SinkFactory) -> None:
    sink = sinks()
    dns.a("dest.test", sink.host)  # RFC 5321 §5.1: implicit MX
    qid = harness.enqueue(["bob@dest.test"])

    async def scenario() -> None:
        async with harness.running():
            await harness.until_gone(qid)

    asyncio.run(scenario())
    assert [t.rcpt_to for t in sink.accepted()] == [("bob@dest.test",)]
    assert ("dest.test", "MX") in dns.queries


def test_mx_preference_fallback_when_first_host_is_down(
    harness: Harness, dns: DnsServer, sinks: SinkFactory
) -> None:
    backup = sinks()
    dns.mx("dest.test", (20, "mx2.dest.test"), (10, "mx1.dest.test"))
    dns.a("mx1.dest.test", dead_address())
    dns.a("mx2.dest.test", backup.host)
    qid = harness.enqueue(["bob@dest.test"])

    async def scenario() -> None:
        async with harness.running():
            await harness.until_gone(qid)

    asyncio.run(scenario())
    assert [t.rcpt_to for t in backup.accepted()] == [("bob@dest.test",)]


def test_mx_preference_order_is_respected(
    harness: Harness, dns: DnsServer, sinks: SinkFactory
) -> None:
    primary, backup = sinks(), sinks()
    dns.mx("dest.test", (20, "mx2.dest.test"), (10, "mx1.dest.test"))
    dns.a("mx1.dest.test", primary.host)
    dns.a("mx2.dest.test", backup.host)
    qid = harness.enqueue(["bob@dest.test"])

    async def scenario() -> None:
        async with harness.running():
            await harness.until_gone(qid)

    asyncio.run(scenario())
    assert len(primary.accepted()) == 1
    assert backup.connections == 0


async def _bounce_of(harness: Harness, bounces: SmtpSink, qid: str) -> None:
    async with harness.running():
        await harness.until_gone(qid)
        await bounces.wait_for_async(1)


def test_nxdomain_fails_at_once_with_a_bounce(
    harness: Harness, dns: DnsServer, sinks: SinkFactory
) -> None:
    bounces = sinks()
    route(dns, SENDER_DOMAIN, bounces)
    qid = harness.enqueue(["bob@nowhere.test"])
    asyncio.run(_bounce_of(harness, bounces, qid))
    [t] = bounces.accepted()
    assert t.mail_from == ""
    assert t.rcpt_to == (SENDER,)
    fields = delivery_status(t.message)
    assert fields[0]["reporting-mta"] == f"dns; {HOSTNAME}"
    assert fields[1]["final-recipient"] == "rfc822; bob@nowhere.test"
    assert fields[1]["action"] == "failed"
    assert fields[1]["status"] == "5.1.2"
    assert "remote-mta" not in fields[1]


def test_null_mx_fails_at_once_with_5_1_10(
    harness: Harness, dns: DnsServer, sinks: SinkFactory
) -> None:
    bounces = sinks()
    route(dns, SENDER_DOMAIN, bounces)
    dns.null_mx("nomail.test")
    qid = harness.enqueue(["bob@nomail.test"])
    asyncio.run(_bounce_of(harness, bounces, qid))
    [t] = bounces.accepted()
    fields = delivery_status(t.message)
    assert fields[1]["status"] == "5.1.10"
    assert fields[1]["diagnostic-code"].startswith("X-mailgate; 556 5.1.10 ")
    # The null MX is final: no address lookups for ".".
    assert not [q for q in dns.queries if q[0] in ("", ".")]


def test_servfail_defers(harness: Harness, dns: DnsServer) -> None:
    dns.servfail("broken.test")
    qid = harness.enqueue(["bob@broken.test"])

    async def scenario() -> None:
        async with harness.running():
            rcpt = await harness.until_attempts(qid, "bob@broken.test", 1)
            assert rcpt.state == "pending"
            assert rcpt.last_reply.startswith("451 4.4.3 ")
            assert rcpt.next_attempt_at is not None

    asyncio.run(scenario())
    assert qid in harness.store.ids()


def test_relay_takes_everything(harness: Harness, dns: DnsServer, sinks: SinkFactory) -> None:
    relay = sinks()
    harness.reconfigure(relay=f"{relay.host}:25", nameservers=())
    qid = harness.enqueue(["bob@one.test", "carol@two.test"])

    async def scenario() -> None:
        async with harness.running():
            await harness.until_gone(qid)

    asyncio.run(scenario())
    [t] = relay.accepted()
    # With a relay, every recipient of the message goes in one transaction.
    assert t.rcpt_to == ("bob@one.test", "carol@two.test")
    assert dns.queries == []


def test_dns_timeout_defers(harness: Harness, dns: DnsServer) -> None:
    harness.reconfigure(connect_timeout=0.5)  # also the DNS lookup budget
    dns.silence("slow.test")
    qid = harness.enqueue(["bob@slow.test"])

    async def scenario() -> None:
        async with harness.running():
            rcpt = await harness.until_attempts(qid, "bob@slow.test", 1)
            assert rcpt.state == "pending"
            assert rcpt.last_reply.startswith("451 4.4.3 ")

    asyncio.run(scenario())

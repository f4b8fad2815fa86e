"""Per-recipient outcomes: retries, flush, bounces, mixed results, expiry, delay warnings."""

from __future__ import annotations

import asyncio
import email.message
import logging
from datetime import timedelta

import pytest

from mailgate.spool.entry import Recipient
from tests.delivery.conftest import (
    SENDER,
    SENDER_DOMAIN,
    Harness,
    SinkFactory,
    delivery_status,
    make_message,
    parse,
    route,
)
from tests.support.dnsserver import DnsServer


def test_tempfail_then_success_after_queue_flush(
    harness: Harness, dns: DnsServer, sinks: SinkFactory
) -> None:
    sink = sinks(rcpt="451 4.3.0 Try again later")
    route(dns, "dest.test", sink)
    qid = harness.enqueue(["bob@dest.test"])

    async def scenario() -> None:
        async with harness.running():
            rcpt = await harness.until_attempts(qid, "bob@dest.test", 1)
            assert rcpt.state == "pending"
            assert rcpt.last_reply == "451 4.3.0 Try again later"
            assert rcpt.next_attempt_at is not None
            # First retry after the first schedule step (60 s here), with ±10 % jitter.
            wait = rcpt.next_attempt_at - rcpt.history[-1].at
            assert timedelta(seconds=54) <= wait <= timedelta(seconds=66)
            [attempt] = rcpt.history
            assert attempt.status == "deferred"
            assert attempt.host == f"mx.dest.test[{sink.host}]:25"
            sink.behaviour.rcpt = "250 2.1.5 Ok"
            # `mailgate queue flush` from another process: the running engine must notice.
            harness.store.flush(qid)
            await harness.until_gone(qid)

    asyncio.run(scenario())
    assert [t.rcpt_to for t in sink.accepted()] == [("bob@dest.test",)]


def test_permanent_failure_bounces_to_sender_with_delivery_status(
    harness: Harness, dns: DnsServer, sinks: SinkFactory
) -> None:
    dest = sinks(rcpt_for={"bob@dest.test": "550 5.1.1 <bob@dest.test>: No such user"})
    bounces = sinks()
    route(dns, "dest.test", dest)
    route(dns, SENDER_DOMAIN, bounces)
    message = make_message("Lost letter")
    qid = harness.enqueue(
        [Recipient("bob@dest.test", orcpt="rfc822;Bob@Dest.test")],
        message=message,
        envid="ENV-42",
    )

    async def scenario() -> None:
        async with harness.running():
            await harness.until_gone(qid)
            await bounces.wait_for_async(1)

    asyncio.run(scenario())
    assert dest.accepted() == []
    [t] = bounces.accepted()
    assert t.mail_from == ""  # RFC 5321 §4.5.5: the null reverse path
    assert t.rcpt_to == (SENDER,)
    msg = parse(t.message)
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == "<Lost-letter@sender.test>"
    fields = delivery_status(t.message)
    assert fields[0]["original-envelope-id"] == "ENV-42"
    assert fields[1] == {
        "original-recipient": "rfc822;Bob@Dest.test",
        "final-recipient": "rfc822; bob@dest.test",
        "action": "failed",
        "status": "5.1.1",
        "remote-mta": "dns; mx.dest.test",
        "diagnostic-code": "smtp; 550 5.1.1 <bob@dest.test>: No such user",
        "last-attempt-date": fields[1]["last-attempt-date"],
    }
    # No RET: the whole original comes back (it is small).
    [returned] = [p for p in msg.walk() if p.get_content_type() == "message/rfc822"]
    inner = returned.get_payload(0)
    assert isinstance(inner, email.message.Message)
    assert inner["Subject"] == "Lost letter"


def test_mixed_outcomes_in_one_message(
    harness: Harness, dns: DnsServer, sinks: SinkFactory
) -> None:
    ok, later, never = sinks(), sinks(rcpt="452 4.2.2 Mailbox full"), sinks(rcpt="554 5.7.1 No")
    bounces = sinks()
    route(dns, "ok.test", ok)
    route(dns, "later.test", later)
    route(dns, "never.test", never)
    route(dns, SENDER_DOMAIN, bounces)
    qid = harness.enqueue(["a@ok.test", "b@later.test", "c@never.test"])

    async def scenario() -> None:
        async with harness.running():
            await harness.until(lambda: all(r.attempts == 1 for r in harness.load(qid).recipients))
            states = {r.address: r.state for r in harness.load(qid).recipients}
            assert states == {"a@ok.test": "delivered", "b@later.test": "pending",
                              "c@never.test": "failed"}  # fmt: skip
            # Restarting or retrying never sends to the one that accepted.
            later.behaviour.rcpt = "250 2.1.5 Ok"
            harness.store.flush(qid)
            await harness.until_gone(qid)
            await bounces.wait_for_async(1)

    asyncio.run(scenario())
    assert [t.rcpt_to for t in ok.accepted()] == [("a@ok.test",)]
    assert [t.rcpt_to for t in later.accepted()] == [("b@later.test",)]
    [t] = bounces.accepted()
    fields = delivery_status(t.message)
    # Only the failed recipient is reported.
    assert [f.get("final-recipient") for f in fields[1:]] == ["rfc822; c@never.test"]
    assert fields[1]["status"] == "5.7.1"


def test_queue_lifetime_expiry_bounces(
    harness: Harness, dns: DnsServer, sinks: SinkFactory, caplog: pytest.LogCaptureFixture
) -> None:
    harness.reconfigure(max_queue_lifetime=600, delay_warning_after=0)
    dest = sinks(rcpt="421 4.4.5 Too busy")
    bounces = sinks()
    route(dns, "dest.test", dest)
    route(dns, SENDER_DOMAIN, bounces)
    qid = harness.enqueue(["bob@dest.test"])

    async def scenario() -> None:
        async with harness.running() as engine:
            rcpt = await harness.until_attempts(qid, "bob@dest.test", 1)
            assert rcpt.state == "pending"
            harness.clock.advance(601)  # past the lifetime: the next try is the last
            engine.wake()
            await harness.until_gone(qid)
            await bounces.wait_for_async(1)

    with caplog.at_level(logging.INFO, logger="mailgate.deliver"):
        asyncio.run(scenario())
    fields = delivery_status(bounces.accepted()[0].message)
    assert fields[1]["action"] == "failed"
    assert fields[1]["status"] == "4.4.5"
    assert fields[1]["diagnostic-code"] == "smtp; 421 4.4.5 Too busy"
    assert any(
        "status=bounced" in r.getMessage() and "delivery time expired" in r.getMessage()
        for r in caplog.records
    )


def test_delay_warning_is_sent_once(harness: Harness, dns: DnsServer, sinks: SinkFactory) -> None:
    harness.reconfigure(delay_warning_after=300)
    dest = sinks(rcpt="450 4.2.1 Mailbox busy")
    notices = sinks()
    route(dns, "dest.test", dest)
    route(dns, SENDER_DOMAIN, notices)
    qid = harness.enqueue(["bob@dest.test"])

    async def scenario() -> None:
        async with harness.running() as engine:
            await harness.until_attempts(qid, "bob@dest.test", 1)
            assert harness.load(qid).warned_at is None
            harness.clock.advance(400)
            engine.wake()
            await harness.until_attempts(qid, "bob@dest.test", 2)
            await notices.wait_for_async(1)
            assert harness.load(qid).warned_at is not None
            harness.clock.advance(400)
            engine.wake()
            await harness.until_attempts(qid, "bob@dest.test", 3)
            # The warning of attempt 2 is the only one.
            await harness.until(lambda: len(harness.store.ids()) == 1)

    asyncio.run(scenario())
    [t] = notices.accepted()
    assert t.mail_from == ""
    msg = parse(t.message)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    fields = delivery_status(t.message)
    assert fields[1]["action"] == "delayed"
    assert fields[1]["status"] == "4.2.1"
    assert "will-retry-until" in fields[1]
    # Delay warnings return the headers only.
    assert any(p.get_content_type() == "text/rfc822-headers" for p in msg.walk())


def test_no_bounce_for_null_sender_but_postmaster_hears_once(
    harness: Harness, dns: DnsServer, sinks: SinkFactory
) -> None:
    dest = sinks(rcpt="550 5.1.1 No such user")
    admin = sinks(rcpt="550 5.1.1 Postmaster gone too")
    route(dns, "dest.test", dest)
    route(dns, "admin.test", admin)
    qid = harness.enqueue(["bob@dest.test"], mail_from="")

    async def scenario() -> None:
        async with harness.running():
            await harness.until_gone(qid)
            # The double bounce to the postmaster fails too, and is dropped, not bounced.
            await harness.until(lambda: any(c.startswith("RCPT") for c in admin.commands))
            await harness.until(lambda: harness.store.ids() == [])

    asyncio.run(scenario())
    assert [c for c in admin.commands if c.startswith("RCPT")] == [
        "RCPT TO:<postmaster@admin.test>"
    ]
    assert all(c.startswith("MAIL FROM:<> ") for c in admin.commands if c.startswith("MAIL"))
    assert all(c.startswith("MAIL FROM:<> ") for c in dest.commands if c.startswith("MAIL"))


def test_notify_never_suppresses_the_bounce(
    harness: Harness, dns: DnsServer, sinks: SinkFactory
) -> None:
    dest = sinks(rcpt="550 5.1.1 No such user")
    bounces = sinks()
    route(dns, "dest.test", dest)
    route(dns, SENDER_DOMAIN, bounces)
    qid = harness.enqueue([Recipient("bob@dest.test", notify=("NEVER",))])

    async def scenario() -> None:
        async with harness.running():
            await harness.until_gone(qid)
            await harness.until(lambda: harness.store.ids() == [])

    asyncio.run(scenario())
    assert bounces.connections == 0


def test_ret_hdrs_returns_headers_only(
    harness: Harness, dns: DnsServer, sinks: SinkFactory
) -> None:
    dest = sinks(end_of_data="554 5.6.0 Content rejected")
    bounces = sinks()
    route(dns, "dest.test", dest)
    route(dns, SENDER_DOMAIN, bounces)
    qid = harness.enqueue(["bob@dest.test"], ret="HDRS", message=make_message(body=b"SECRET\r\n"))

    async def scenario() -> None:
        async with harness.running():
            await harness.until_gone(qid)
            await bounces.wait_for_async(1)

    asyncio.run(scenario())
    [t] = bounces.accepted()
    assert b"SECRET" not in t.message
    msg = parse(t.message)
    [headers] = [p for p in msg.walk() if p.get_content_type() == "text/rfc822-headers"]
    assert b"Subject: Hello" in headers.get_payload(decode=True)
    assert delivery_status(t.message)[1]["diagnostic-code"] == "smtp; 554 5.6.0 Content rejected"


def test_success_notice_when_next_hop_lacks_dsn(
    harness: Harness, dns: DnsServer, sinks: SinkFactory
) -> None:
    dest = sinks(dsn=False)
    notices = sinks()
    route(dns, "dest.test", dest)
    route(dns, SENDER_DOMAIN, notices)
    qid = harness.enqueue([Recipient("bob@dest.test", notify=("SUCCESS", "FAILURE"))])

    async def scenario() -> None:
        async with harness.running():
            await harness.until_gone(qid)
            await notices.wait_for_async(1)

    asyncio.run(scenario())
    [t] = notices.accepted()
    msg = parse(t.message)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    fields = delivery_status(t.message)
    assert fields[1]["action"] == "relayed"
    assert fields[1]["status"] == "2.0.0"


def test_dsn_parameters_are_passed_on_to_dsn_servers(
    harness: Harness, dns: DnsServer, sinks: SinkFactory
) -> None:
    dest = sinks(dsn=True)
    notices = sinks()
    route(dns, "dest.test", dest)
    route(dns, SENDER_DOMAIN, notices)
    rcpt = Recipient("bob@dest.test", notify=("SUCCESS", "DELAY"), orcpt="rfc822;bob+x=y@dest.test")
    qid = harness.enqueue([rcpt], ret="HDRS", envid="id 1+2")

    async def scenario() -> None:
        async with harness.running():
            await harness.until_gone(qid)

    asyncio.run(scenario())
    [t] = dest.accepted()
    assert "RET=HDRS" in t.mail_params
    assert "ENVID=id+201+2B2" in t.mail_params  # RFC 3461 §4 xtext
    assert t.rcpt_params["bob@dest.test"] == (
        "NOTIFY=SUCCESS,DELAY",
        "ORCPT=rfc822;bob+2Bx+3Dy@dest.test",
    )
    # The DSN-capable next hop took the SUCCESS request over: no notice from us.
    assert notices.connections == 0
    assert t.mail_from == SENDER


def test_large_message_bounce_returns_its_headers_read_without_the_body(
    harness: Harness, dns: DnsServer, sinks: SinkFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = sinks(end_of_data="554 5.6.0 Content rejected")
    bounces = sinks()
    route(dns, "dest.test", dest)
    route(dns, SENDER_DOMAIN, bounces)
    body = b"SECRET line of a large message\r\n" * 20_000
    qid = harness.enqueue(["bob@dest.test"], message=make_message(body=body))
    whole_reads: list[str] = []
    read_message = harness.store.read_message

    def counted(qid: str) -> bytes:
        whole_reads.append(qid)
        return read_message(qid)

    monkeypatch.setattr(harness.store, "read_message", counted)

    async def scenario() -> None:
        async with harness.running():
            await harness.until_gone(qid)
            await bounces.wait_for_async(1)

    asyncio.run(scenario())
    assert qid not in whole_reads  # streamed to the server; only its headers for the DSN
    [t] = bounces.accepted()
    assert b"SECRET" not in t.message
    msg = parse(t.message)
    [headers] = [p for p in msg.walk() if p.get_content_type() == "text/rfc822-headers"]
    payload = headers.get_payload(decode=True)
    assert isinstance(payload, bytes) and payload.endswith(b"Message-ID: <Hello@sender.test>\r\n")
    assert delivery_status(t.message)[1]["diagnostic-code"] == "smtp; 554 5.6.0 Content rejected"

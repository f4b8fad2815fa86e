"""What goes over the wire: CRLF and dot-stuffing, SMTPUTF8/8BITMIME, STARTTLS, hop limit,
connection reuse and limits, hold/release, refusals at connect time."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate.errors import SpoolError
from mailgate.smtp.client import encode_message
from mailgate.spool.entry import Recipient
from tests.delivery.conftest import (
    SENDER_DOMAIN,
    Harness,
    SinkFactory,
    delivery_status,
    make_message,
    route,
)
from tests.support.dnsserver import DnsServer
from tests.support.smtpsink import self_signed_context


async def _deliver(harness: Harness, *qids: str) -> None:
    async with harness.running():
        for qid in qids:
            await harness.until_gone(qid)


def test_output_is_strict_crlf_and_dot_stuffed(
    harness: Harness, dns: DnsServer, sinks: SinkFactory
) -> None:
    sink = sinks()
    route(dns, "dest.test", sink)
    stored = b"Subject: x\n\nline1\n.\nline2\r.\r\nline3\r\n.leading dot\r\nlast"
    qid = harness.enqueue(["bob@dest.test"], message=stored)
    asyncio.run(_deliver(harness, qid))
    [t] = sink.accepted()
    # Bare LF and bare CR became CRLF; every line starting with "." got another one; no
    # "\r\n.\r\n" inside the data (RFC 5321 §2.3.8, §4.5.2: no smuggling through us).
    assert t.raw == (
        b"Subject: x\r\n\r\nline1\r\n..\r\nline2\r\n..\r\nline3\r\n..leading dot\r\nlast\r\n"
    )
    assert b"\r\n.\r\n" not in b"\r\n" + t.raw


@pytest.mark.parametrize("lines", [1, 4000])  # in memory; streamed in chunks
@pytest.mark.parametrize("service", ["smarthost", "submission", "bounce", ""])
def test_a_message_received_over_smtp_has_its_header_section_normalised_and_its_body_stuffed(
    harness: Harness, dns: DnsServer, sinks: SinkFactory, service: str, lines: int
) -> None:
    # A received message's body has CR and LF only as CRLF (DATA refused the others): the
    # encoder only stuffs its dots. Its header section, partly ours, is normalised anyway.
    # A body with a bare LF cannot come over SMTP: it shows which messages are trusted.
    sink = sinks()
    route(dns, "dest.test", sink)
    filler = b"x" * 76 + b"\r\n.\r\n"
    body = b".one\r\ntwo\r\n" + filler * lines + b"bare\nlf\r\n"
    stored = b"X-Ours: a\nSubject: x\r\n\r\n" + body
    qid = harness.enqueue(["bob@dest.test"], message=stored, service=service)
    asyncio.run(_deliver(harness, qid))
    [t] = sink.accepted()
    trusted = service in ("smarthost", "submission")
    tail = b"bare\nlf\r\n" if trusted else b"bare\r\nlf\r\n"
    assert t.raw == (
        b"X-Ours: a\r\nSubject: x\r\n\r\n..one\r\ntwo\r\n"
        + (b"x" * 76 + b"\r\n..\r\n") * lines
        + tail
    )


@pytest.mark.parametrize("offered", [True, False])
def test_large_message_is_streamed_strict_crlf_dot_stuffed_and_8bit_when_offered(
    harness: Harness, dns: DnsServer, sinks: SinkFactory, offered: bool
) -> None:
    # Over CACHED_MESSAGE: sent from the spool a chunk at a time (256 KiB); the line shapes
    # repeat with every possible offset against the chunk boundaries.
    sink = sinks(eightbitmime=offered)
    route(dns, "dest.test", sink)
    lines = [b".dot", b"plain\r", b"bare lf\n", b"..two", b"caf\xc3\xa9", b"", b"x" * 77]
    text = b"".join(lines[i % len(lines)] + b" %d\r\n" % i for i in range(40_000))
    stored = b"Subject: big\n\n" + text + b"last"
    assert len(stored) > 3 * 256 * 1024
    qid = harness.enqueue(["bob@dest.test"], message=stored)
    asyncio.run(_deliver(harness, qid))
    [t] = sink.accepted()
    assert t.raw == encode_message(stored)[: -len(b".\r\n")]
    assert b"\r\n.\r\n" not in b"\r\n" + t.raw
    assert ("BODY=8BITMIME" in t.mail_params) is offered


def test_spool_read_error_while_streaming_never_sends_the_final_dot(
    harness: Harness, dns: DnsServer, sinks: SinkFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = sinks()
    route(dns, "dest.test", sink)
    stored = b"Subject: big\r\n\r\n" + b"line of text\r\n" * 50_000
    qid = harness.enqueue(["bob@dest.test"], message=stored)
    reads = harness.store.read_chunks
    calls = []

    def failing(qid: str, size: int = 256 * 1024) -> Iterator[bytes]:
        calls.append(qid)
        chunks = reads(qid, size)
        yield next(chunks)
        if len(calls) > 1:  # the first pass only looks at the message; the second sends it
            raise SpoolError("disk went away")
        yield from chunks

    monkeypatch.setattr(harness.store, "read_chunks", failing)

    async def scenario() -> None:
        async with harness.running():
            await harness.until_attempts(qid, "bob@dest.test", 1)

    asyncio.run(scenario())
    assert sink.accepted() == []  # the truncated text was never ended with a dot
    [rcpt] = harness.load(qid).recipients
    assert rcpt.state == "pending" and rcpt.attempts == 1


def test_smtputf8_message_to_a_server_without_it_bounces_5_6_7(
    harness: Harness, dns: DnsServer, sinks: SinkFactory
) -> None:
    dest = sinks(smtputf8=False)
    bounces = sinks()
    route(dns, "dest.test", dest)
    route(dns, SENDER_DOMAIN, bounces)
    message = "Subject: Grüße\r\nFrom: <alice@sender.test>\r\n\r\nHallo\r\n".encode()
    qid = harness.enqueue(["bob@dest.test"], message=message, smtputf8=True)

    async def scenario() -> None:
        async with harness.running():
            await harness.until_gone(qid)
            await bounces.wait_for_async(1)

    asyncio.run(scenario())
    assert dest.transactions == []
    assert not any(c.startswith("MAIL") for c in dest.commands)
    fields = delivery_status(bounces.accepted()[0].message)
    assert fields[1]["status"] == "5.6.7"


def test_smtputf8_is_used_when_offered(
    harness: Harness, dns: DnsServer, sinks: SinkFactory
) -> None:
    dest = sinks(smtputf8=True)
    route(dns, "dest.test", dest)
    message = "Subject: Grüße\r\n\r\nHallo\r\n".encode()
    qid = harness.enqueue(["jörg@dest.test"], message=message, smtputf8=True)
    asyncio.run(_deliver(harness, qid))
    [t] = dest.accepted()
    assert "SMTPUTF8" in t.mail_params
    assert t.rcpt_to == ("jörg@dest.test",)
    assert t.message == message


def test_smtputf8_flag_without_utf8_content_needs_no_smtputf8(
    harness: Harness, dns: DnsServer, sinks: SinkFactory
) -> None:
    dest = sinks(smtputf8=False)
    route(dns, "dest.test", dest)
    qid = harness.enqueue(["bob@dest.test"], smtputf8=True)
    asyncio.run(_deliver(harness, qid))
    [t] = dest.accepted()
    assert "SMTPUTF8" not in t.mail_params


@pytest.mark.parametrize("offered", [True, False])
def test_8bitmime_only_when_offered(
    harness: Harness, dns: DnsServer, sinks: SinkFactory, offered: bool
) -> None:
    dest = sinks(eightbitmime=offered)
    route(dns, "dest.test", dest)
    message = "Subject: x\r\n\r\nCaf\u00e9\r\n".encode()
    qid = harness.enqueue(["bob@dest.test"], message=message, body="8BITMIME")
    asyncio.run(_deliver(harness, qid))
    [t] = dest.accepted()
    assert ("BODY=8BITMIME" in t.mail_params) is offered
    assert t.message == message


def test_opportunistic_starttls(
    harness: Harness,
    dns: DnsServer,
    sinks: SinkFactory,
    sink_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dest = sinks(tls=sink_tls, starttls=True)
    route(dns, "dest.test", dest)
    qid = harness.enqueue(["bob@dest.test"])
    with caplog.at_level(logging.INFO, logger="mailgate.deliver"):
        asyncio.run(_deliver(harness, qid))
    [t] = dest.accepted()
    assert t.tls
    # RFC 3207 §4.2: EHLO again after TLS.
    assert [c.split()[0] for c in dest.commands[:3]] == ["EHLO", "STARTTLS", "EHLO"]
    [line] = [r.getMessage() for r in caplog.records if "to=<bob@dest.test>" in r.getMessage()]
    assert " tls=yes verified=no " in line


def test_hop_limit_fails_with_5_4_6(harness: Harness, dns: DnsServer, sinks: SinkFactory) -> None:
    harness.reconfigure(hop_limit=5)
    dest, bounces = sinks(), sinks()
    route(dns, "dest.test", dest)
    route(dns, SENDER_DOMAIN, bounces)
    loop = b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n" * 6
    qid = harness.enqueue(["bob@dest.test"], message=loop + make_message())

    async def scenario() -> None:
        async with harness.running():
            await harness.until_gone(qid)
            await bounces.wait_for_async(1)

    asyncio.run(scenario())
    assert dest.connections == 0
    fields = delivery_status(bounces.accepted()[0].message)
    assert fields[1]["status"] == "5.4.6"


def test_connection_is_reused_for_further_messages(
    harness: Harness, dns: DnsServer, sinks: SinkFactory
) -> None:
    harness.reconfigure(max_per_destination=1)
    dest = sinks()
    route(dns, "dest.test", dest)
    qids = [harness.enqueue([f"r{n}@dest.test"]) for n in range(5)]
    asyncio.run(_deliver(harness, *qids))
    assert len(dest.accepted()) == 5
    assert dest.connections == 1


def test_per_destination_limit(harness: Harness, dns: DnsServer, sinks: SinkFactory) -> None:
    harness.reconfigure(max_per_destination=2)
    dest = sinks()
    route(dns, "dest.test", dest)
    qids = [harness.enqueue([f"r{n}@dest.test"]) for n in range(20)]
    asyncio.run(_deliver(harness, *qids))
    assert len(dest.accepted()) == 20
    assert 1 <= dest.connections <= 2


def test_rejected_recipient_does_not_spoil_the_connection(
    harness: Harness, dns: DnsServer, sinks: SinkFactory
) -> None:
    harness.reconfigure(max_per_destination=1)
    dest = sinks(rcpt_for={"bad@dest.test": "550 5.1.1 No"})
    bounces = sinks()
    route(dns, "dest.test", dest)
    route(dns, SENDER_DOMAIN, bounces)
    first = harness.enqueue(["bad@dest.test"])
    second = harness.enqueue(["good@dest.test"])

    async def scenario() -> None:
        async with harness.running():
            await harness.until_gone(first)
            await harness.until_gone(second)
            await bounces.wait_for_async(1)

    asyncio.run(scenario())
    assert [t.rcpt_to for t in dest.accepted()] == [("good@dest.test",)]
    assert "RSET" in dest.commands
    assert dest.connections == 1


def test_held_entry_waits_for_release(harness: Harness, dns: DnsServer, sinks: SinkFactory) -> None:
    dest = sinks()
    route(dns, "dest.test", dest)
    held = harness.enqueue(["held@dest.test"], held=True)
    free = harness.enqueue(["free@dest.test"])

    async def scenario() -> None:
        async with harness.running():
            await harness.until_gone(free)
            assert harness.load(held).recipients[0].attempts == 0
            harness.store.release(held)  # `mailgate queue release`, noticed via the poke
            await harness.until_gone(held)

    asyncio.run(scenario())
    assert [t.rcpt_to for t in dest.accepted()] == [("free@dest.test",), ("held@dest.test",)]


@pytest.mark.parametrize(
    ("greeting", "state"), [("554 5.3.2 No service", "failed"), ("421 4.3.2 Busy", "pending")]
)
def test_refusal_at_greeting(
    harness: Harness, dns: DnsServer, sinks: SinkFactory, greeting: str, state: str
) -> None:
    dest = sinks(greeting=greeting)
    route(dns, "dest.test", dest)
    qid = harness.enqueue([Recipient("bob@dest.test", notify=("NEVER",))])

    async def scenario() -> None:
        async with harness.running():
            if state == "failed":
                await harness.until_gone(qid)
            else:
                rcpt = await harness.until_attempts(qid, "bob@dest.test", 1)
                assert rcpt.state == "pending"
                assert rcpt.last_reply == greeting

    asyncio.run(scenario())
    assert dest.transactions == []


def test_operator_delete_while_deferred(
    harness: Harness, dns: DnsServer, sinks: SinkFactory
) -> None:
    dest = sinks(rcpt="451 4.3.0 Later")
    route(dns, "dest.test", dest)
    qid = harness.enqueue(["bob@dest.test"])
    other = harness.enqueue(["carol@dest.test"])

    async def scenario() -> None:
        async with harness.running() as engine:
            await harness.until_attempts(qid, "bob@dest.test", 1)
            await harness.until_attempts(other, "carol@dest.test", 1)
            harness.store.delete(qid)
            dest.behaviour.rcpt = "250 2.1.5 Ok"
            harness.store.flush()
            await harness.until_gone(other)
            assert qid not in engine._envelopes  # forgotten, not retried

    asyncio.run(scenario())
    assert [t.rcpt_to for t in dest.accepted()] == [("carol@dest.test",)]


def test_failed_tls_handshake_falls_back_to_plaintext(
    harness: Harness, dns: DnsServer, sinks: SinkFactory, tmp_path: Path
) -> None:
    # A server that demands a client certificate: our handshake fails, and opportunistic TLS
    # means delivering in plaintext rather than not at all.
    strict = self_signed_context(tmp_path / "strict", "mx.dest.test")
    strict.verify_mode = ssl.CERT_REQUIRED
    strict.load_verify_locations(tmp_path / "strict" / "sink-cert.pem")
    dest = sinks(tls=strict, starttls=True)
    route(dns, "dest.test", dest)
    qid = harness.enqueue(["bob@dest.test"])
    asyncio.run(_deliver(harness, qid))
    [t] = dest.accepted()
    assert not t.tls
    assert dest.connections == 2

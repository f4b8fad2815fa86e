"""Verified TLS to MX hosts over real loopback SMTP, DNS and HTTPS: MTA-STS, DANE, the policy
table, REQUIRETLS and `TLS-Required: No`.

The MX sinks present certificates from a test CA (tests/support/testca.py), which is the
engine's `delivery.tls.ca_file`; policies come from an HTTPS server on loopback
(tests/support/stsserver.py) that the test DNS server names as `mta-sts.DOMAIN`; "signed"
zones of the test DNS server answer with the AD bit. Every case asserts the delivery log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailgate.config import DeliveryTlsConfig
from mailgate.deliver.tlsrpt import parse_report
from mailgate.spool.entry import Envelope
from tests.delivery.conftest import (
    HOSTNAME,
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
from tests.support.smtpsink import SmtpSink
from tests.support.stsserver import StsServer
from tests.support.testca import WRONG_NAME, Kind, TestCA

DOMAINS = ["dest.test", SENDER_DOMAIN]
RCPT = "bob@dest.test"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def sts(ca: TestCA, dns: DnsServer) -> Iterator[StsServer]:
    with StsServer(ca, DOMAINS) as server:
        for domain in DOMAINS:
            dns.a(f"mta-sts.{domain}", server.host)
        yield server


@pytest.fixture
def tls_harness(tmp_path: Path, dns: DnsServer, ca: TestCA, sts: StsServer) -> Harness:
    return Harness(
        tmp_path, dns, tls=DeliveryTlsConfig(ca_file=ca.cert_path, mta_sts_port=sts.port)
    )


def publish_sts(dns: DnsServer, sts: StsServer, domain: str, mode: str, mx: list[str],
                policy_id: str = "20240101") -> None:  # fmt: skip
    dns.txt(f"_mta-sts.{domain}", f"v=STSv1; id={policy_id};")
    sts.policy(domain, mode=mode, mx=mx)


def mx_sink(sinks: SinkFactory, ca: TestCA, kind: Kind = "valid", name: str = "mx.dest.test",
            **behaviour: Any) -> SmtpSink:  # fmt: skip
    return sinks(tls=ca.server_context(name, kind=kind), starttls=True, **behaviour)


def delivery_lines(caplog: pytest.LogCaptureFixture, address: str = RCPT) -> list[str]:
    return [m for r in caplog.records if f"to=<{address}> relay=" in (m := r.getMessage())]


async def _until_tried(harness: Harness, qid: str, attempts: int = 1) -> Envelope:
    async with harness.running():
        await harness.until_attempts(qid, RCPT, attempts)
    return harness.load(qid)


async def _until_gone(harness: Harness, qid: str) -> None:
    async with harness.running():
        await harness.until_gone(qid)


def run(coro: Any, caplog: pytest.LogCaptureFixture) -> Any:
    with caplog.at_level(logging.INFO, logger="mailgate.deliver"):
        return asyncio.run(coro)


# --- MTA-STS ---------------------------------------------------------------------------------


def test_mta_sts_enforce_with_a_valid_certificate_delivers_verified(
    tls_harness: Harness, dns: DnsServer, sts: StsServer, sinks: SinkFactory, ca: TestCA,
    caplog: pytest.LogCaptureFixture, tmp_path: Path,
) -> None:  # fmt: skip
    sink = mx_sink(sinks, ca)
    route(dns, "dest.test", sink)
    publish_sts(dns, sts, "dest.test", "enforce", ["mx.dest.test"])
    qid = tls_harness.enqueue([RCPT])
    run(_until_gone(tls_harness, qid), caplog)
    [t] = sink.accepted()
    assert t.tls
    [line] = delivery_lines(caplog)
    print(line)
    assert " tls=yes verified=yes policy=mta-sts-enforce " in line
    assert line.endswith(' status=sent reply="250 2.0.0 Ok: queued"')
    assert ("mta-sts.dest.test", "/.well-known/mta-sts.txt") in sts.requests
    cached = json.loads((tmp_path / "spool" / "mta-sts" / "dest.test.json").read_text())
    assert cached["id"] == "20240101" and cached["max_age"] == 86400
    assert cached["mode"] == "enforce" and cached["mx"] == ["mx.dest.test"]


@pytest.mark.parametrize(
    ("kind", "why", "peer"),
    [
        ("wrong-name", "not valid for", WRONG_NAME),
        ("self-signed", "", "mx.dest.test"),
        ("expired", "", "mx.dest.test"),
    ],
)
def test_mta_sts_enforce_with_a_bad_certificate_stays_deferred(
    tls_harness: Harness, dns: DnsServer, sts: StsServer, sinks: SinkFactory, ca: TestCA,
    caplog: pytest.LogCaptureFixture, kind: Kind, why: str, peer: str,
) -> None:  # fmt: skip
    sink = mx_sink(sinks, ca, kind)
    route(dns, "dest.test", sink)
    publish_sts(dns, sts, "dest.test", "enforce", ["mx.dest.test"])
    qid = tls_harness.enqueue([RCPT])
    env = run(_until_tried(tls_harness, qid), caplog)
    [rcpt] = env.recipients
    assert rcpt.state == "pending"
    assert rcpt.last_reply.startswith("451 4.7.5 MTA-STS policy of dest.test: mx.dest.test[")
    assert f"(peer certificate: {peer})" in rcpt.last_reply
    # Never delivered: the session ended before MAIL.
    assert sink.transactions == []
    assert not any(c.upper().startswith("MAIL") for c in sink.commands)
    [line] = delivery_lines(caplog)
    print(line)
    assert " tls=yes verified=no policy=mta-sts-enforce " in line
    assert f' peer_cert="{peer}"' in line
    assert " status=deferred " in line


def test_mta_sts_enforce_refuses_an_mx_not_in_the_policy(
    tls_harness: Harness, dns: DnsServer, sts: StsServer, sinks: SinkFactory, ca: TestCA,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    sink = mx_sink(sinks, ca)
    route(dns, "dest.test", sink)
    publish_sts(dns, sts, "dest.test", "enforce", ["mx.elsewhere.test"])
    qid = tls_harness.enqueue([RCPT])
    env = run(_until_tried(tls_harness, qid), caplog)
    [rcpt] = env.recipients
    assert rcpt.state == "pending"
    assert rcpt.last_reply == (
        "451 4.7.5 MTA-STS policy of dest.test: MX host mx.dest.test is not in the policy "
        "(mx: mx.elsewhere.test)"
    )
    assert sink.connections == 0
    [line] = delivery_lines(caplog)
    print(line)
    assert " policy=mta-sts-enforce " in line and " status=deferred " in line


def test_mta_sts_testing_delivers_and_logs_what_would_have_failed(
    tls_harness: Harness, dns: DnsServer, sts: StsServer, sinks: SinkFactory, ca: TestCA,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    sink = mx_sink(sinks, ca, "self-signed")
    route(dns, "dest.test", sink)
    publish_sts(dns, sts, "dest.test", "testing", ["mx.dest.test"])
    qid = tls_harness.enqueue([RCPT])
    run(_until_gone(tls_harness, qid), caplog)
    assert len(sink.accepted()) == 1
    [line] = delivery_lines(caplog)
    print(line)
    assert " tls=yes verified=no policy=mta-sts-testing " in line
    assert ' status=sent reply="250 2.0.0 Ok: queued" peer_cert="mx.dest.test"' in line
    assert ' tls_note="MTA-STS policy of dest.test: certificate would not be accepted: ' in line


def test_tls_required_no_ignores_an_mta_sts_policy(
    tls_harness: Harness, dns: DnsServer, sts: StsServer, sinks: SinkFactory, ca: TestCA,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    sink = mx_sink(sinks, ca, "self-signed")
    route(dns, "dest.test", sink)
    publish_sts(dns, sts, "dest.test", "enforce", ["mx.dest.test"])
    message = make_message().replace(b"Subject:", b"TLS-Required: No\r\nSubject:")
    qid = tls_harness.enqueue([RCPT], message=message)
    run(_until_gone(tls_harness, qid), caplog)
    assert len(sink.accepted()) == 1
    [line] = delivery_lines(caplog)
    assert " tls=yes verified=no policy=none " in line


def test_mta_sts_deferral_bounces_with_5_7_5_when_the_lifetime_ends(
    tls_harness: Harness, dns: DnsServer, sts: StsServer, sinks: SinkFactory, ca: TestCA,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    tls_harness.reconfigure(max_queue_lifetime=100, retry_schedule=(60,))
    sink = mx_sink(sinks, ca, "wrong-name")
    bounces = sinks()
    route(dns, "dest.test", sink)
    route(dns, SENDER_DOMAIN, bounces)
    publish_sts(dns, sts, "dest.test", "enforce", ["mx.dest.test"])
    qid = tls_harness.enqueue([RCPT])

    async def scenario() -> None:
        async with tls_harness.running() as engine:
            await tls_harness.until_attempts(qid, RCPT, 1)
            tls_harness.clock.advance(200)
            engine.wake()
            await tls_harness.until_gone(qid)
            await bounces.wait_for_async(1)

    run(scenario(), caplog)
    assert sink.transactions == []
    [dsn] = bounces.accepted()
    [_, block] = delivery_status(dsn.message)
    assert block["status"] == "5.7.5"
    assert block["action"] == "failed"
    assert block["diagnostic-code"].startswith("X-mailgate; 451 4.7.5 MTA-STS policy of dest.test")
    assert "remote-mta" not in block
    line = delivery_lines(caplog)[-1]
    print(line)
    assert " status=bounced " in line and "(delivery time expired)" in line


# --- DANE --------------------------------------------------------------------------------------


def dane_harness(tmp_path: Path, dns: DnsServer, ca: TestCA) -> Harness:
    return Harness(tmp_path, dns, tls=DeliveryTlsConfig(ca_file=None, mta_sts=False))


@pytest.mark.parametrize(("usage", "selector", "mtype"), [(3, 1, 1), (3, 0, 2), (2, 0, 1)])
def test_dane_match_delivers_verified(
    tmp_path: Path, dns: DnsServer, sinks: SinkFactory, ca: TestCA,
    caplog: pytest.LogCaptureFixture, usage: int, selector: int, mtype: int,
) -> None:  # fmt: skip
    harness = dane_harness(tmp_path, dns, ca)
    sink = mx_sink(sinks, ca)
    route(dns, "dest.test", sink)
    dns.tlsa("_25._tcp.mx.dest.test", ca.tlsa("mx.dest.test", usage=usage, selector=selector,
                                             mtype=mtype))  # fmt: skip
    dns.sign("dest.test")
    qid = harness.enqueue([RCPT])
    run(_until_gone(harness, qid), caplog)
    assert len(sink.accepted()) == 1
    [line] = delivery_lines(caplog)
    print(line)
    assert " tls=yes verified=yes policy=dane " in line and " status=sent " in line


def test_dane_mismatch_stays_deferred(
    tmp_path: Path, dns: DnsServer, sinks: SinkFactory, ca: TestCA,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    harness = dane_harness(tmp_path, dns, ca)
    sink = mx_sink(sinks, ca)
    route(dns, "dest.test", sink)
    # A record for another key: the certificate presented does not match.
    dns.tlsa("_25._tcp.mx.dest.test", ca.tlsa("other.dest.test"))
    dns.sign("dest.test")
    qid = harness.enqueue([RCPT])
    env = run(_until_tried(harness, qid), caplog)
    [rcpt] = env.recipients
    assert rcpt.state == "pending"
    assert rcpt.last_reply.startswith("451 4.7.5 DANE for mx.dest.test: mx.dest.test[")
    assert "no TLSA record matches the certificate chain" in rcpt.last_reply
    assert sink.transactions == []
    [line] = delivery_lines(caplog)
    print(line)
    assert " tls=yes verified=no policy=dane " in line
    assert ' peer_cert="mx.dest.test"' in line and " status=deferred " in line


def test_dane_is_not_applied_without_the_ad_bit(
    tmp_path: Path, dns: DnsServer, sinks: SinkFactory, ca: TestCA,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    harness = dane_harness(tmp_path, dns, ca)
    sink = mx_sink(sinks, ca)
    route(dns, "dest.test", sink)
    dns.tlsa("_25._tcp.mx.dest.test", ca.tlsa("other.dest.test"))  # would not match
    qid = harness.enqueue([RCPT])  # the zone is not signed: no AD bit
    run(_until_gone(harness, qid), caplog)
    assert len(sink.accepted()) == 1
    # RFC 7672 §2.2: TLSA records of an insecure MX host are not even looked up.
    assert ("_25._tcp.mx.dest.test", "TLSA") not in dns.queries
    [line] = delivery_lines(caplog)
    print(line)
    assert " tls=yes verified=no policy=none " in line and " status=sent " in line


def test_dane_with_a_failing_tlsa_lookup_defers(
    tmp_path: Path, dns: DnsServer, sinks: SinkFactory, ca: TestCA,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    harness = dane_harness(tmp_path, dns, ca)
    sink = mx_sink(sinks, ca)
    route(dns, "dest.test", sink)
    dns.sign("dest.test")
    dns.servfail("_25._tcp.mx.dest.test")
    qid = harness.enqueue([RCPT])
    env = run(_until_tried(harness, qid), caplog)
    assert env.recipients[0].last_reply.startswith("451 4.7.5 DANE for mx.dest.test: TLSA ")
    assert sink.connections == 0


# --- the policy table ------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "delivered"), [("valid", True), ("self-signed", False)])
def test_policy_table_verify(
    tmp_path: Path, dns: DnsServer, sinks: SinkFactory, ca: TestCA,
    caplog: pytest.LogCaptureFixture, kind: Kind, delivered: bool,
) -> None:  # fmt: skip
    harness = Harness(tmp_path, dns, tls=DeliveryTlsConfig(
        ca_file=ca.cert_path, mta_sts=False, policy={"dest.test": "verify"}))  # fmt: skip
    sink = mx_sink(sinks, ca, kind)
    route(dns, "dest.test", sink)
    qid = harness.enqueue([RCPT])
    if delivered:
        run(_until_gone(harness, qid), caplog)
        assert len(sink.accepted()) == 1
        [line] = delivery_lines(caplog)
        assert " tls=yes verified=yes policy=table " in line and " status=sent " in line
    else:
        env = run(_until_tried(harness, qid), caplog)
        assert env.recipients[0].last_reply.startswith(
            "451 4.7.5 TLS policy table for dest.test (verify): mx.dest.test["
        )
        assert sink.transactions == []
        [line] = delivery_lines(caplog)
        assert " tls=yes verified=no policy=table " in line and " status=deferred " in line
    print(line)


def test_policy_table_encrypt_refuses_plaintext(
    tmp_path: Path, dns: DnsServer, sinks: SinkFactory, ca: TestCA,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    harness = Harness(tmp_path, dns, tls=DeliveryTlsConfig(
        mta_sts=False, policy={"dest.test": "encrypt"}))  # fmt: skip
    sink = sinks()  # no STARTTLS
    route(dns, "dest.test", sink)
    qid = harness.enqueue([RCPT])
    env = run(_until_tried(harness, qid), caplog)
    assert env.recipients[0].last_reply.startswith(
        "451 4.7.10 TLS policy table for dest.test (encrypt): mx.dest.test["
    )
    assert sink.transactions == []


# --- REQUIRETLS ------------------------------------------------------------------------------


def test_requiretls_to_an_mx_without_it_bounces_with_5_7_30(
    tls_harness: Harness, dns: DnsServer, sts: StsServer, sinks: SinkFactory, ca: TestCA,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    sink = mx_sink(sinks, ca)  # verified TLS, but no REQUIRETLS
    bounces = mx_sink(sinks, ca, name=f"mx.{SENDER_DOMAIN}", requiretls=True)
    route(dns, "dest.test", sink)
    route(dns, SENDER_DOMAIN, bounces)
    publish_sts(dns, sts, "dest.test", "enforce", ["mx.dest.test"])
    publish_sts(dns, sts, SENDER_DOMAIN, "enforce", [f"mx.{SENDER_DOMAIN}"])
    qid = tls_harness.enqueue([RCPT], requiretls=True)

    async def scenario() -> None:
        async with tls_harness.running():
            await tls_harness.until_gone(qid)
            await bounces.wait_for_async(1)

    run(scenario(), caplog)
    assert sink.transactions == []
    [dsn] = bounces.accepted()
    # RFC 8689 §5: the bounce itself goes with REQUIRETLS, over verified TLS.
    assert "REQUIRETLS" in dsn.mail_params and dsn.tls and dsn.mail_from == ""
    [_, block] = delivery_status(dsn.message)
    assert block["status"] == "5.7.30"
    assert b"Hello, world." not in dsn.message  # headers only
    [line] = delivery_lines(caplog)
    print(line)
    assert " tls=yes verified=yes policy=mta-sts-enforce requiretls=yes " in line
    assert ' status=bounced reply="550 5.7.30 REQUIRETLS support required' in line
    [bounce_line] = delivery_lines(caplog, SENDER)
    print(bounce_line)
    assert " verified=yes " in bounce_line and " requiretls=yes " in bounce_line


def test_requiretls_is_passed_on_to_an_mx_that_offers_it(
    tls_harness: Harness, dns: DnsServer, sts: StsServer, sinks: SinkFactory, ca: TestCA,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    sink = mx_sink(sinks, ca, requiretls=True)
    route(dns, "dest.test", sink)
    publish_sts(dns, sts, "dest.test", "enforce", ["mx.dest.test"])
    qid = tls_harness.enqueue([RCPT], requiretls=True)
    run(_until_gone(tls_harness, qid), caplog)
    [t] = sink.accepted()
    assert t.tls and "REQUIRETLS" in t.mail_params
    [line] = delivery_lines(caplog)
    print(line)
    assert " tls=yes verified=yes policy=mta-sts-enforce requiretls=yes " in line


def test_requiretls_needs_an_authenticated_mx(
    tls_harness: Harness, dns: DnsServer, sinks: SinkFactory, ca: TestCA,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    sink = mx_sink(sinks, ca, requiretls=True)
    bounces = sinks()
    route(dns, "dest.test", sink)  # neither DNSSEC nor MTA-STS vouches for the MX
    route(dns, SENDER_DOMAIN, bounces)
    qid = tls_harness.enqueue([RCPT], requiretls=True)

    async def scenario() -> None:
        async with tls_harness.running():
            await tls_harness.until_gone(qid)

    run(scenario(), caplog)
    assert sink.connections == 0
    [line] = delivery_lines(caplog)
    print(line)
    assert ' status=bounced reply="550 5.7.30 REQUIRETLS cannot be honoured: MX host ' in line


# --- TLS-RPT ---------------------------------------------------------------------------------


def test_tlsrpt_report_for_a_failed_day_is_sent_and_parses(
    tls_harness: Harness, dns: DnsServer, sts: StsServer, sinks: SinkFactory, ca: TestCA,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    sink = mx_sink(sinks, ca, "wrong-name")
    reports = sinks()
    route(dns, "dest.test", sink)
    route(dns, "reports.test", reports)
    publish_sts(dns, sts, "dest.test", "enforce", ["mx.dest.test"])
    dns.txt("_smtp._tls.dest.test", "v=TLSRPTv1; rua=mailto:tlsrpt@reports.test")
    qid = tls_harness.enqueue([RCPT])

    async def scenario() -> None:
        async with tls_harness.running() as engine:
            await tls_harness.until_attempts(qid, RCPT, 1)
            tls_harness.clock.advance(86400)  # the day of the failure is over
            engine.wake()
            await reports.wait_for_async(1, timeout=15)

    run(scenario(), caplog)
    [t] = reports.accepted()
    assert t.rcpt_to == ("tlsrpt@reports.test",) and t.mail_from == "postmaster@admin.test"
    msg = parse(t.message)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    assert msg["TLS-Report-Domain"] == "dest.test"
    assert msg["TLS-Report-Submitter"] == HOSTNAME
    [attachment] = [p for p in msg.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
    filename = attachment.get_filename()
    assert filename is not None and filename.startswith(f"{HOSTNAME}!dest.test!")
    assert filename.endswith(".json.gz")
    report = parse_report(t.message)
    print(json.dumps(report, indent=1))
    assert report["organization-name"] == HOSTNAME
    assert report["contact-info"] == "postmaster@admin.test"
    assert report["date-range"]["start-datetime"].endswith("T00:00:00Z")
    [policy] = report["policies"]
    assert policy["policy"] == {
        "policy-type": "sts",
        "policy-string": ["version: STSv1", "mode: enforce", "mx: mx.dest.test",
                          "max_age: 86400"],
        "policy-domain": "dest.test",
        "mx-host": ["mx.dest.test"],
    }  # fmt: skip
    assert policy["summary"] == {
        "total-successful-session-count": 0,
        "total-failure-session-count": 1,
    }
    [detail] = policy["failure-details"]
    assert detail["result-type"] == "certificate-host-mismatch"
    assert detail["receiving-mx-hostname"] == "mx.dest.test"
    assert detail["receiving-ip"] == sink.host
    assert detail["sending-mta-ip"] == "127.0.0.1"
    assert detail["failed-session-count"] == 1
    assert any("tlsrpt report domain=dest.test" in r.getMessage() for r in caplog.records)


def test_a_slow_policy_fetch_does_not_hold_delivery_and_is_cached_in_the_background(
    tmp_path: Path, dns: DnsServer, sts: StsServer, sinks: SinkFactory, ca: TestCA,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    tls = DeliveryTlsConfig(ca_file=ca.cert_path, mta_sts_port=sts.port)
    harness = Harness(tmp_path, dns, connect_timeout=1.0, tls=tls)
    sink = mx_sink(sinks, ca)
    route(dns, "dest.test", sink)
    # The policy would refuse this MX; while its host does not answer, nobody knows that.
    publish_sts(dns, sts, "dest.test", "enforce", ["mx.elsewhere.test"])
    sts.answering.clear()
    cache = tmp_path / "spool" / "mta-sts" / "dest.test.json"
    first = harness.enqueue([RCPT])

    async def scenario() -> None:
        async with harness.running():
            # RFC 8461 §5.1 first contact: delivered without a policy after the bounded wait.
            await harness.until_gone(first)
            assert sts.requests and not cache.exists()
            sts.answering.set()  # the fetch that went on in the background completes
            await harness.until(cache.exists)
        # A new engine (a restart) finds the policy on disk and obeys it without a fetch.
        second = harness.enqueue([RCPT])
        async with harness.running():
            await harness.until_attempts(second, RCPT, 1)
        reply = harness.load(second).recipients[0].last_reply
        assert reply.startswith("451 4.7.5 MTA-STS policy of dest.test: MX host mx.dest.test ")

    run(scenario(), caplog)
    assert len(sink.accepted()) == 1
    lines = delivery_lines(caplog)
    print("\n".join(lines))
    assert " policy=none " in lines[0] and " status=sent " in lines[0]
    assert " policy=mta-sts-enforce " in lines[1] and " status=deferred " in lines[1]
    assert len(sts.requests) == 1  # the second delivery used the cache


@pytest.mark.parametrize("starttls", [True, False])
def test_dane_with_only_unusable_records_requires_tls_but_not_authentication(
    tmp_path: Path, dns: DnsServer, sinks: SinkFactory, ca: TestCA,
    caplog: pytest.LogCaptureFixture, starttls: bool,
) -> None:  # fmt: skip
    harness = dane_harness(tmp_path, dns, ca)
    sink = mx_sink(sinks, ca, "self-signed") if starttls else sinks()
    route(dns, "dest.test", sink)
    dns.tlsa("_25._tcp.mx.dest.test", (1, 1, 1, "00" * 32))  # PKIX-EE: unusable for SMTP
    dns.sign("dest.test")
    qid = harness.enqueue([RCPT])
    if starttls:
        run(_until_gone(harness, qid), caplog)
        assert len(sink.accepted()) == 1
        [line] = delivery_lines(caplog)
        assert " tls=yes verified=no policy=dane " in line and " status=sent " in line
        assert "tls_note=" not in line  # nothing is required beyond TLS: nothing would fail
    else:
        env = run(_until_tried(harness, qid), caplog)
        assert env.recipients[0].last_reply.startswith("451 4.7.10 DANE for mx.dest.test: ")
        assert sink.transactions == []
        [line] = delivery_lines(caplog)
        assert " tls=no verified=no policy=dane " in line and " status=deferred " in line
    print(line)


def test_policy_table_may_overrides_an_mta_sts_policy_and_logs(
    tmp_path: Path, dns: DnsServer, sts: StsServer, sinks: SinkFactory, ca: TestCA,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    tls = DeliveryTlsConfig(ca_file=ca.cert_path, mta_sts_port=sts.port,
                            policy={"dest.test": "may"})  # fmt: skip
    harness = Harness(tmp_path, dns, tls=tls)
    sink = mx_sink(sinks, ca, "expired")
    route(dns, "dest.test", sink)
    publish_sts(dns, sts, "dest.test", "enforce", ["mx.dest.test"])
    qid = harness.enqueue([RCPT])
    run(_until_gone(harness, qid), caplog)
    assert len(sink.accepted()) == 1
    assert sts.requests == []  # the operator's table wins: no MTA-STS look-up at all
    [line] = delivery_lines(caplog)
    print(line)
    assert " tls=yes verified=no policy=table " in line
    assert (
        ' tls_note="TLS policy table for dest.test (may): certificate would not be accepted: '
        in line
    )


def test_policy_table_dane_requires_usable_records(
    tmp_path: Path, dns: DnsServer, sinks: SinkFactory, ca: TestCA,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    tls = DeliveryTlsConfig(mta_sts=False, policy={"dest.test": "dane"})
    harness = Harness(tmp_path, dns, tls=tls)
    sink = mx_sink(sinks, ca)
    route(dns, "dest.test", sink)
    qid = harness.enqueue([RCPT])  # no TLSA records, unsigned zone
    env = run(_until_tried(harness, qid), caplog)
    assert env.recipients[0].last_reply.startswith(
        "451 4.7.5 TLS policy table for dest.test (dane): mx.dest.test: no usable TLSA records"
    )
    assert sink.connections == 0

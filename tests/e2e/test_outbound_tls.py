"""Verified TLS outbound, end to end through `mailgate serve`: MTA-STS enforce, DANE and
REQUIRETLS from submission to the recipients' MX hosts.

Real pieces on loopback: the test DNS server (signed zones set the AD bit), an HTTPS server
serving MTA-STS policies, recording MX servers with certificates from a test CA (the gateway's
`delivery.tls.ca_file`), smtplib as the submission client. Assertions are on the delivery log
lines of the server, on `mailgate queue list`, and on what the MX servers received.
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path

import pytest

from tests.e2e.conftest import ALICE, message, submission
from tests.support.dnsserver import DnsServer
from tests.support.gateway import Gateway
from tests.support.smtpsink import Behaviour, SmtpSink
from tests.support.stsserver import StsServer
from tests.support.testca import Kind, TestCA
from tests.support.waiting import wait_for

REMOTE = "remote.test"
HOME = "example.org"  # the gateway's default domain: alice@example.org gets the bounces


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


@pytest.fixture
def sts(ca: TestCA, dns: DnsServer) -> Iterator[StsServer]:
    with StsServer(ca, [REMOTE, HOME]) as server:
        for domain in (REMOTE, HOME):
            dns.a(f"mta-sts.{domain}", server.host)
        yield server


class Network:
    """MX sinks started for a test, each published in DNS as mx.DOMAIN."""

    def __init__(self, dns: DnsServer, sts: StsServer, ca: TestCA) -> None:
        self.dns, self.sts, self.ca = dns, sts, ca
        self.sinks: list[SmtpSink] = []

    def mx(self, domain: str, kind: Kind = "valid", *, requiretls: bool = False) -> SmtpSink:
        tls = self.ca.server_context(f"mx.{domain}", kind=kind)
        behaviour = Behaviour(starttls=True, requiretls=requiretls)
        sink = SmtpSink(tls=tls, behaviour=behaviour).start()
        self.sinks.append(sink)
        self.dns.mx(domain, (10, f"mx.{domain}"))
        self.dns.a(f"mx.{domain}", sink.host)
        return sink

    def enforce(self, domain: str) -> None:
        self.dns.txt(f"_mta-sts.{domain}", "v=STSv1; id=e2e1;")
        self.sts.policy(domain, mode="enforce", mx=[f"mx.{domain}"])


@pytest.fixture
def net(dns: DnsServer, sts: StsServer, ca: TestCA) -> Iterator[Network]:
    network = Network(dns, sts, ca)
    yield network
    for sink in network.sinks:
        sink.stop()


@pytest.fixture
def gateway(
    tmp_path: Path, dns: DnsServer, sts: StsServer, ca: TestCA, net: Network
) -> Iterator[Gateway]:
    # Depends on `net` so that it stops first: no pooled connection outlives the sinks.
    delivery = {
        "nameservers": [dns.nameserver],
        "smtp_port": 25,
        "relay": "",
        "retry_schedule": [600],
        "connect_timeout": 5,
        "tls": {"ca_file": str(ca.cert_path), "mta_sts_port": sts.port},
    }
    gw = Gateway(tmp_path / "gw", {"delivery": delivery, "server": {"workers": 0}})
    gw.add_user(*ALICE)
    gw.start()
    try:
        yield gw
    finally:
        gw.finish()


def delivery_line(gw: Gateway, address: str) -> str:
    pattern = re.compile(rf"qid=\S+ to=<{re.escape(address)}> relay=.*")
    found = wait_for(lambda: pattern.search(gw.log_text()), timeout=20, what=f"log for {address}")
    line = found.group(0)
    print(line)
    return str(line)


def send(gw: Gateway, to: str, *, requiretls: bool = False) -> None:
    with submission(gw) as client:
        assert client.has_extn("requiretls") is True
        options = ["REQUIRETLS"] if requiretls else []
        client.sendmail("alice@example.org", [to], message(to=to, body="Secret.\r\n"), options)


def test_enforce_with_a_valid_certificate_is_delivered_verified(
    gateway: Gateway, net: Network
) -> None:
    mx = net.mx(REMOTE)
    net.enforce(REMOTE)
    send(gateway, f"bob@{REMOTE}")
    [t] = mx.wait_for(1, timeout=20)
    assert t.tls and t.rcpt_to == (f"bob@{REMOTE}",)
    line = delivery_line(gateway, f"bob@{REMOTE}")
    assert " tls=yes verified=yes policy=mta-sts-enforce " in line
    assert line.endswith(' status=sent reply="250 2.0.0 Ok: queued"')


def test_enforce_with_a_wrong_certificate_stays_queued_with_the_reason(
    gateway: Gateway, net: Network
) -> None:
    mx = net.mx(REMOTE, kind="wrong-name")
    net.enforce(REMOTE)
    send(gateway, f"bob@{REMOTE}")
    line = delivery_line(gateway, f"bob@{REMOTE}")
    assert " tls=yes verified=no policy=mta-sts-enforce " in line
    assert ' status=deferred reply="451 4.7.5 MTA-STS policy of remote.test: ' in line
    assert line.endswith(' peer_cert="wrong.example"')
    listing = gateway.cli("queue", "list").stdout
    print(listing)
    assert (
        "last error: 451 4.7.5 MTA-STS policy of remote.test: mx.remote.test[" in listing
        and "certificate not accepted: leaf certificate has no matching subjectAltName "
        "(peer certificate: wrong.example)"
        in listing
    )
    assert mx.transactions == []
    assert not any(c.upper().startswith("MAIL") for c in mx.commands)


def test_dane_match_is_delivered(gateway: Gateway, net: Network, dns: DnsServer,
                                 ca: TestCA) -> None:  # fmt: skip
    mx = net.mx(REMOTE)
    dns.tlsa(f"_25._tcp.mx.{REMOTE}", ca.tlsa(f"mx.{REMOTE}", usage=3, selector=1, mtype=1))
    dns.sign(REMOTE)
    send(gateway, f"bob@{REMOTE}")
    mx.wait_for(1, timeout=20)
    line = delivery_line(gateway, f"bob@{REMOTE}")
    assert " tls=yes verified=yes policy=dane " in line and " status=sent " in line


def test_requiretls_to_an_mx_without_it_bounces_with_5_7_30(gateway: Gateway, net: Network) -> None:
    mx = net.mx(REMOTE)  # verified, but does not offer REQUIRETLS
    home = net.mx(HOME, requiretls=True)
    net.enforce(REMOTE)
    net.enforce(HOME)
    send(gateway, f"bob@{REMOTE}", requiretls=True)
    [dsn] = home.wait_for(1, timeout=30)
    assert mx.transactions == []
    assert dsn.mail_from == "" and dsn.rcpt_to == ("alice@example.org",)
    assert dsn.tls and "REQUIRETLS" in dsn.mail_params
    report = message_from_bytes(dsn.message)
    assert report.get_content_type() == "multipart/report"
    text = dsn.message.decode("utf-8", "replace")
    assert "Status: 5.7.30" in text
    assert "Secret." not in text  # headers only
    line = delivery_line(gateway, f"bob@{REMOTE}")
    assert " tls=yes verified=yes policy=mta-sts-enforce requiretls=yes " in line
    assert ' status=bounced reply="550 5.7.30 REQUIRETLS support required: ' in line


def test_requiretls_is_refused_where_it_is_not_offered(gateway: Gateway) -> None:
    with smtplib.SMTP("127.0.0.1", gateway.ports["smarthost"], timeout=10) as client:
        client.ehlo("lab.test")
        assert not client.has_extn("requiretls")
        code, text = client.mail("cron@lab.test", ["REQUIRETLS"])
        assert (code, text[:5]) == (555, b"5.5.4")

"""[smarthost] bad_nets: MX hosts inside it are never connected to."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import replace

from mailgate.config import SmarthostConfig
from tests.delivery.conftest import (
    SENDER_DOMAIN,
    Harness,
    SinkFactory,
    delivery_status,
    route,
)
from tests.support.dnsserver import DnsServer
from tests.support.smtpsink import SmtpSink


def test_mx_inside_bad_nets_is_skipped_or_refused(
    harness: Harness, dns: DnsServer, sinks: SinkFactory
) -> None:
    harness.cfg = replace(
        harness.cfg,
        smarthost=SmarthostConfig(bad_nets=(ipaddress.ip_network("127.0.0.99/32"),)),
    )
    inside = SmtpSink(host="127.0.0.99").start()  # would record any connection
    good = sinks()
    bounces = sinks()
    route(dns, SENDER_DOMAIN, bounces)
    dns.mx("inside.test", (10, "mx.inside.test"))
    dns.a("mx.inside.test", "127.0.0.99")
    # mixed.test prefers the internal host; only the outside one may be used.
    dns.mx("mixed.test", (10, "mx1.mixed.test"), (20, "mx2.mixed.test"))
    dns.a("mx1.mixed.test", "127.0.0.99")
    dns.a("mx2.mixed.test", good.host)
    refused = harness.enqueue(["a@inside.test"])
    mixed = harness.enqueue(["b@mixed.test"])

    async def scenario() -> None:
        async with harness.running():
            await harness.until_gone(refused)
            await harness.until_gone(mixed)
            await bounces.wait_for_async(1)

    try:
        asyncio.run(scenario())
    finally:
        inside.stop()
    assert inside.connections == 0
    assert [t.rcpt_to for t in good.accepted()] == [("b@mixed.test",)]
    fields = delivery_status(bounces.accepted()[0].message)
    assert fields[1]["status"] == "5.4.4"

"""A pooled connection that the server closed while it was idle costs a reconnect, not a retry."""

from __future__ import annotations

import asyncio

from tests.delivery.conftest import Harness, SinkFactory, route
from tests.support.dnsserver import DnsServer
from tests.support.smtpsink import SmtpSink


def test_server_restart_during_idle_is_a_reconnect(
    harness: Harness, dns: DnsServer, sinks: SinkFactory
) -> None:
    harness.reconfigure(max_per_destination=1)
    first_sink = sinks()
    route(dns, "dest.test", first_sink)

    async def scenario() -> SmtpSink:
        async with harness.running() as engine:
            first = harness.enqueue(["a@dest.test"])
            engine.wake(first)
            await harness.until_gone(first)
            # The idle pooled connection dies with the server; a new one listens at once.
            first_sink.stop()
            second_sink = SmtpSink(host=first_sink.host).start()
            try:
                second = harness.enqueue(["b@dest.test"])
                engine.wake(second)
                await harness.until_gone(second, timeout=10)  # the clock never advances
            finally:
                second_sink.stop()
            return second_sink

    second_sink = asyncio.run(scenario())
    [t] = second_sink.accepted()
    assert t.rcpt_to == ("b@dest.test",)


def test_silently_dropped_pooled_connection_is_replaced_not_deferred(
    harness: Harness, dns: DnsServer, sinks: SinkFactory
) -> None:
    harness.reconfigure(max_per_destination=1)
    dest = sinks(hang_up_on_mail_after=1)  # each connection takes one message, then drops
    route(dns, "dest.test", dest)
    qids = [harness.enqueue([f"r{n}@dest.test"]) for n in range(3)]

    async def scenario() -> None:
        async with harness.running() as engine:
            for qid in qids:
                engine.wake(qid)
            for qid in qids:
                await harness.until_gone(qid, timeout=10)  # the clock never advances

    asyncio.run(scenario())
    assert sorted(t.rcpt_to[0] for t in dest.accepted()) == [f"r{n}@dest.test" for n in range(3)]
    assert dest.connections == 3

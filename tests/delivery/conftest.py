"""Fixtures for delivery tests: a test DNS server, recording SMTP sinks, a spool and an engine.

Everything is real and on loopback: the engine resolves through `tests/support/dnsserver.py`
(`delivery.nameservers = ["127.0.0.1:<port>"]`) and connects to `tests/support/smtpsink.py`
servers on 127.0.0.x:25. Time is driven through the engine's injectable clock, never slept.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.message
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailgate.config import Config, DeliveryConfig, DirectoryConfig, SpoolConfig
from mailgate.deliver.engine import Engine
from mailgate.spool.entry import Envelope, Recipient, utcnow
from mailgate.spool.ids import new_queue_id
from mailgate.spool.journal import JournalStore
from tests.support.dnsserver import DnsServer
from tests.support.smtpsink import Behaviour, SmtpSink, self_signed_context
from tests.support.waiting import wait_for_async

HOSTNAME = "mail.example.org"
SENDER_DOMAIN = "sender.test"
SENDER = f"alice@{SENDER_DOMAIN}"


def make_message(subject: str = "Hello", body: bytes = b"Hello, world.\r\n") -> bytes:
    return (
        b"Received: from client.test by mail.example.org; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"From: Alice <" + SENDER.encode() + b">\r\n"
        b"To: Bob <bob@dest.test>\r\n"
        b"Subject: " + subject.encode() + b"\r\n"
        b"Message-ID: <" + subject.encode().replace(b" ", b"-") + b"@sender.test>\r\n"
        b"\r\n" + body
    )


class Clock:
    """Real time plus an offset the test advances (never behind the real clock, so that
    `SpoolStore.flush()`, which stamps real time, makes entries due)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return utcnow() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


class Harness:
    """A spool, a config and an engine for one test."""

    def __init__(self, tmp_path: Path, dns: DnsServer, **delivery: Any) -> None:
        self.tmp_path = tmp_path
        self.dns = dns
        self.clock = Clock()
        settings: dict[str, Any] = {
            "nameservers": (("127.0.0.1", dns.port),),
            "smtp_port": 25,
            "retry_schedule": (60, 120, 240),
            "connect_timeout": 3.0,
            "command_timeout": 5.0,
            "postmaster": "postmaster@admin.test",
        }
        settings.update(delivery)
        self.cfg = Config(
            path=tmp_path / "mailgate.toml",
            hostname=HOSTNAME,
            directory=DirectoryConfig(default_domain="example.org"),
            spool=SpoolConfig(tmp_path / "spool"),
            delivery=DeliveryConfig(**settings),
        )
        self.store = JournalStore(self.cfg.spool.path)
        self.engine: Engine | None = None

    def reconfigure(self, **delivery: Any) -> None:
        self.cfg = replace(self.cfg, delivery=replace(self.cfg.delivery, **delivery))

    def enqueue(
        self,
        recipients: list[str] | list[Recipient],
        *,
        mail_from: str = SENDER,
        message: bytes | None = None,
        **fields: Any,
    ) -> str:
        rcpts = tuple(r if isinstance(r, Recipient) else Recipient(r) for r in recipients)
        data = message if message is not None else make_message()
        env = Envelope(
            id=new_queue_id(),
            mail_from=mail_from,
            recipients=rcpts,
            received_at=self.clock(),
            size=len(data),
            **fields,
        )
        return self.store.enqueue(env, data).id

    def load(self, qid: str) -> Envelope:
        return self.store.load(qid)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Engine]:
        engine = Engine(self.cfg, self.store, now=self.clock)
        self.engine = engine
        task = asyncio.get_running_loop().create_task(engine.run())
        try:
            yield engine
        finally:
            await engine.stop()
            await asyncio.wait_for(task, 15)

    async def until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Poll `predicate` (bounded) while the engine runs."""
        await wait_for_async(predicate, timeout)

    async def until_gone(self, qid: str, timeout: float = 10.0) -> None:
        await self.until(lambda: qid not in self.store.ids(), timeout)

    async def until_attempts(self, qid: str, address: str, attempts: int) -> Recipient:
        def reached() -> bool:
            return any(
                r.address == address and r.attempts >= attempts
                for r in self.store.load(qid).recipients
            )

        await self.until(reached)
        return next(r for r in self.store.load(qid).recipients if r.address == address)


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


@pytest.fixture(scope="session")
def sink_tls(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    return self_signed_context(tmp_path_factory.mktemp("sink-tls"), "mx.dest.test")


SinkFactory = Callable[..., SmtpSink]


@pytest.fixture
def sinks() -> Iterator[SinkFactory]:
    """`sinks(**behaviour)` starts a sink on the first free 127.0.0.x:25."""
    started: list[SmtpSink] = []

    def make(tls: ssl.SSLContext | None = None, **behaviour: Any) -> SmtpSink:
        sink = SmtpSink(tls=tls, behaviour=Behaviour(**behaviour)).start()
        started.append(sink)
        return sink

    yield make
    for sink in started:
        sink.stop()


@pytest.fixture
def harness(tmp_path: Path, dns: DnsServer) -> Harness:
    return Harness(tmp_path, dns)


def route(dns: DnsServer, domain: str, sink: SmtpSink, pref: int = 10) -> None:
    """domain MX -> mx.<domain> A -> the sink's address."""
    dns.mx(domain, (pref, f"mx.{domain}"))
    dns.a(f"mx.{domain}", sink.host)


def parse(message: bytes) -> email.message.Message:
    return email.message_from_bytes(message)


def delivery_status(dsn: bytes) -> list[dict[str, str]]:
    """The field groups of the message/delivery-status part: per-message, then per recipient."""
    msg = parse(dsn)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    for part in msg.walk():
        if part.get_content_type() in ("message/delivery-status", "message/global-delivery-status"):
            # The email package parses message/delivery-status into one message per field
            # group, message/global-delivery-status (RFC 6533) into one message: flatten
            # either back to text and split the groups at empty lines.
            payload = part.get_payload()
            assert isinstance(payload, list)
            text = "\n\n".join(str(b) for b in payload).replace("\r\n", "\n")
            blocks = [email.message_from_string(b) for b in text.split("\n\n") if b.strip()]
            return [{k.lower(): str(v) for k, v in block.items()} for block in blocks]
    raise AssertionError("no delivery-status part")

"""End-to-end fixtures: a real `mailgate serve` on loopback ports with a user alice/secret."""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.gateway import Gateway

ALICE = ("alice", "correct horse battery")
BOB = ("bob", "bob's password")


def client_tls() -> ssl.SSLContext:
    """The gateway's certificate is self-signed: tests do not verify it."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.fixture
def stopping() -> Iterator[list[Gateway]]:
    """Gateways a test starts are stopped (and their log shown on failure) afterwards."""
    started: list[Gateway] = []
    yield started
    for gw in started:
        gw.finish()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    gw = Gateway(tmp_path / "gw")
    gw.add_user(*ALICE)
    gw.add_user(*BOB)
    gw.start("--no-delivery")
    try:
        yield gw
    finally:
        gw.finish()


def submission(gw: Gateway, login: tuple[str, str] | None = ALICE) -> smtplib.SMTP:
    """A client on 587 after STARTTLS (and AUTH when `login` is given)."""
    client = smtplib.SMTP("127.0.0.1", gw.ports["submission"], timeout=10)
    client.ehlo("client.test")
    client.starttls(context=client_tls())
    client.ehlo("client.test")
    if login is not None:
        client.login(*login)
    return client


def submissions(gw: Gateway, login: tuple[str, str] | None = ALICE) -> smtplib.SMTP_SSL:
    client = smtplib.SMTP_SSL("127.0.0.1", gw.ports["submissions"], timeout=10,
                              context=client_tls())  # fmt: skip
    client.ehlo("client.test")
    if login is not None:
        client.login(*login)
    return client


def message(frm: str = "alice@example.org", to: str = "someone@remote.test",
            subject: str = "hello", body: str = "Hello there.\r\n",
            extra: str = "") -> bytes:  # fmt: skip
    return (f"From: {frm}\r\nTo: {to}\r\nSubject: {subject}\r\n{extra}\r\n{body}").encode()

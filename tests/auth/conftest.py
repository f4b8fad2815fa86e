"""Shared helpers for the [auth] backend tests: AUTH through a real `mailgate serve`."""

from __future__ import annotations

import base64
import smtplib

from tests.e2e.conftest import client_tls
from tests.support.gateway import Gateway

# The AUTH defence's delays would slow every failure test down; the defence itself is tested
# with its own thresholds (test_*_auth_defence).
QUIET_GUARD = {"auth_delay_after": 1000, "auth_refuse_after": 1000,
               "auth_login_refuse_after": 1000}  # fmt: skip


def connect(gw: Gateway) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", gw.ports["submission"], timeout=30)
    client.ehlo("client.test")
    client.starttls(context=client_tls())
    client.ehlo("client.test")
    return client


def auth_plain(client: smtplib.SMTP, login: str, password: str) -> tuple[int, bytes]:
    """AUTH PLAIN with an initial response (RFC 4954 §4): the reply code and text."""
    token = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
    return client.docmd("AUTH", f"PLAIN {token}")


def try_login(gw: Gateway, login: str, password: str) -> tuple[int, bytes]:
    client = connect(gw)
    try:
        return auth_plain(client, login, password)
    finally:
        client.close()


def head_of(gw: Gateway, qid: str) -> str:
    return gw.message(qid).split(b"\r\n\r\n", 1)[0].decode()

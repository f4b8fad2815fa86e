"""INTERFACE.md's "Replies a client can rely on", row by row, against a live `mailgate serve` with
a real clamd: each situation is made by a real client, and the whole reply line is asserted.

Two rows need a setting of their own and are driven where that setting lives: the spool that
cannot be written (452 4.3.1) by tests/e2e/test_disk_full.py on a full tmpfs, and the internal
error (451 4.3.0) by tests/e2e/test_session_errors.py with components that fail on demand.
"""

from __future__ import annotations

import re
import smtplib
import socket
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.e2e.conftest import ALICE, BOB, message, submission, submissions
from tests.support.clamd import EICAR, EICAR_FOUND_NAME, ClamdHandle, running_clamd
from tests.support.gateway import DEFAULT_DOMAIN, Gateway

pytestmark = pytest.mark.e2e

MAX_SIZE = 20000
MAX_RECIPIENTS = 3


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClamdHandle]:
    with running_clamd(tmp_path_factory.mktemp("clamd")) as handle:
        yield handle


def table_gateway(root: Path, clamd: ClamdHandle) -> Gateway:
    gw = Gateway(root, {
        "scanner": {"clamd": clamd.tcp_spec},
        "limits": {"max_message_size": MAX_SIZE, "max_recipients": MAX_RECIPIENTS},
        "smarthost": {"networks": ["127.0.0.1/32"]},  # 127.0.0.9 is outside
    })  # fmt: skip
    gw.add_user(*ALICE)
    gw.add_user(*BOB)
    return gw


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, clamd: ClamdHandle) -> Iterator[Gateway]:
    gw = table_gateway(tmp_path_factory.mktemp("replytable"), clamd)
    gw.start("--no-delivery")
    try:
        yield gw
    finally:
        gw.finish()


def line(reply: tuple[int, bytes]) -> str:
    return f"{reply[0]} {reply[1].decode()}"


def plaintext(gw: Gateway) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", gw.ports["submission"], timeout=10)
    client.ehlo("client.test")
    return client


def with_attachment(filename: str, payload: bytes) -> bytes:
    msg = EmailMessage()
    msg["From"] = "alice@example.org"
    msg["To"] = "someone@remote.test"
    msg["Subject"] = "attachment"
    msg.set_content("See attached.\n")
    msg.add_attachment(payload, maintype="application", subtype="octet-stream",
                       filename=filename)  # fmt: skip
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def send(gw: Gateway, data: bytes) -> tuple[int, bytes]:
    """Alice submits `data` on 587 after STARTTLS and AUTH: the reply to the end of DATA."""
    client = submission(gw)
    try:
        client.mail("alice@example.org")
        client.rcpt("someone@remote.test")
        return client.data(data)
    finally:
        client.close()


# --- the situations: each returns the reply the client got -----------------------------------
def auth_before_starttls(gw: Gateway) -> tuple[int, bytes]:
    with plaintext(gw) as client:
        return client.docmd("AUTH", "PLAIN AGFsaWNlAHNlY3JldA==")


def mail_before_starttls(gw: Gateway) -> tuple[int, bytes]:
    with plaintext(gw) as client:
        return client.docmd("MAIL", "FROM:<alice@example.org>")


def mail_without_auth_on_587(gw: Gateway) -> tuple[int, bytes]:
    client = submission(gw, login=None)
    try:
        return client.docmd("MAIL", "FROM:<alice@example.org>")
    finally:
        client.close()


def mail_without_auth_on_465(gw: Gateway) -> tuple[int, bytes]:
    client = submissions(gw, login=None)
    try:
        return client.docmd("MAIL", "FROM:<alice@example.org>")
    finally:
        client.close()


def bad_credentials(gw: Gateway) -> tuple[int, bytes]:
    client = submission(gw, login=None)
    try:
        client.login(ALICE[0], "not alice's password")
    except smtplib.SMTPAuthenticationError as e:
        assert isinstance(e.smtp_error, bytes)
        return e.smtp_code, e.smtp_error
    finally:
        client.close()
    raise AssertionError("a wrong password logged in")


def relay_from_outside_networks(gw: Gateway) -> tuple[int, bytes]:
    sock = socket.create_connection(("127.0.0.1", gw.ports["smarthost"]), timeout=10,
                                    source_address=("127.0.0.9", 0))  # fmt: skip
    client = smtplib.SMTP(timeout=10)
    client.sock = sock
    try:
        assert client.getreply()[0] == 220
        client.ehlo("outsider.test")
        client.mail("someone@outsider.test")
        return client.rcpt("victim@remote.test")
    finally:
        client.close()


def sender_not_allowed(gw: Gateway) -> tuple[int, bytes]:
    client = submission(gw)  # alice, sending as bob's primary address
    try:
        return client.docmd("MAIL", f"FROM:<bob@{DEFAULT_DOMAIN}>")
    finally:
        client.close()


def declared_size_over_the_limit(gw: Gateway) -> tuple[int, bytes]:
    client = submission(gw)
    try:
        return client.docmd("MAIL", f"FROM:<alice@example.org> SIZE={MAX_SIZE + 1}")
    finally:
        client.close()


def message_over_the_limit(gw: Gateway) -> tuple[int, bytes]:
    return send(gw, message(body="x" * 76 + "\r\n") + b"y" * 76 * 300 + b"\r\n")


def virus_found(gw: Gateway) -> tuple[int, bytes]:
    return send(gw, with_attachment("readme.txt", EICAR))


def blocked_file_type(gw: Gateway) -> tuple[int, bytes]:
    return send(gw, with_attachment("invoice.pdf.exe", b"harmless bytes"))


def too_many_recipients(gw: Gateway) -> tuple[int, bytes]:
    client = submission(gw)
    try:
        client.mail("alice@example.org")
        for n in range(MAX_RECIPIENTS):
            assert client.rcpt(f"r{n}@remote.test")[0] == 250
        return client.rcpt("one-too-many@remote.test")
    finally:
        client.close()


ROWS: list[tuple[str, Callable[[Gateway], tuple[int, bytes]], str]] = [
    ("AUTH before STARTTLS on submission", auth_before_starttls,
     "530 5.7.0 Must issue a STARTTLS command first"),
    ("MAIL before STARTTLS on submission", mail_before_starttls,
     "530 5.7.0 Must issue a STARTTLS command first"),
    ("MAIL without AUTH on submission", mail_without_auth_on_587,
     "530 5.7.0 Authentication required"),
    ("MAIL without AUTH on submissions", mail_without_auth_on_465,
     "530 5.7.0 Authentication required"),
    ("bad credentials", bad_credentials, "535 5.7.8 Authentication credentials invalid"),
    ("relay attempt on smarthost from outside networks", relay_from_outside_networks,
     "550 5.7.1 Relaying denied"),
    ("sender address in the default domain that the user may not use", sender_not_allowed,
     "553 5.7.1 Sender address not allowed for this login"),
    ("message over max_message_size, declared with SIZE", declared_size_over_the_limit,
     "552 5.3.4 Message too big"),
    ("message over max_message_size, sent", message_over_the_limit, "552 5.3.4 Message too big"),
    ("virus found", virus_found, f"554 5.7.1 Message rejected: virus found ({EICAR_FOUND_NAME})"),
    ("blocked file type", blocked_file_type,
     "554 5.7.1 Message rejected: attachment 'invoice.pdf.exe' is a blocked file type;"
     " put it in a zip archive and send it again"),
    ("too many recipients", too_many_recipients, "452 4.5.3 Too many recipients"),
]  # fmt: skip


@pytest.mark.parametrize(("situation", "make", "expected"), ROWS, ids=[row[0] for row in ROWS])
def test_the_reply_table(
    gateway: Gateway, situation: str, make: Callable[[Gateway], tuple[int, bytes]], expected: str
) -> None:
    before = set(gateway.queued())
    assert line(make(gateway)) == expected, situation
    assert set(gateway.queued()) == before  # a refusal never leaves anything in the spool


def test_accepted_is_250_with_the_queue_id_of_a_message_on_disk(gateway: Gateway) -> None:
    before = set(gateway.queued())
    reply = line(send(gateway, message(subject="accepted")))
    match = re.fullmatch(r"250 2\.0\.0 Ok: queued as (\w+)", reply)
    assert match is not None, reply
    assert set(gateway.queued()) - before == {match.group(1)}


def test_scanner_unavailable_is_451_471_and_nothing_is_accepted(tmp_path: Path) -> None:
    with running_clamd(tmp_path / "clamd") as clamd:
        gw = table_gateway(tmp_path / "gw", clamd)
        gw.start("--no-delivery")
        try:
            clamd.stop()
            reply = line(send(gw, message(subject="while clamd is down")))
            assert reply == "451 4.7.1 Content scanner unavailable, try again later"
            assert gw.queued() == []
        finally:
            gw.finish()

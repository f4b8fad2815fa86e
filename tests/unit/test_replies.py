"""Every row of INTERFACE.md's reply table: situation in, exact code and enhanced status out."""

from __future__ import annotations

import pytest

from mailgate import replies
from mailgate.replies import Reply

TABLE: list[tuple[str, Reply, int, str]] = [
    ("AUTH or MAIL before STARTTLS on submission", replies.STARTTLS_REQUIRED, 530, "5.7.0"),
    ("MAIL without AUTH on submission", replies.AUTH_REQUIRED, 530, "5.7.0"),
    ("bad credentials", replies.BAD_CREDENTIALS, 535, "5.7.8"),
    ("relay attempt on smarthost", replies.RELAY_DENIED, 550, "5.7.1"),
    ("sender not allowed", replies.SENDER_NOT_ALLOWED, 553, "5.7.1"),
    ("message too big", replies.MESSAGE_TOO_BIG, 552, "5.3.4"),
    ("virus found", replies.virus_found("Eicar-Test-Signature"), 554, "5.7.1"),
    ("blocked file type", replies.blocked_file("invoice.pdf.exe"), 554, "5.7.1"),
    ("scanner unavailable", replies.SCANNER_UNAVAILABLE, 451, "4.7.1"),
    ("spool cannot be written", replies.SPOOL_FULL, 452, "4.3.1"),
    ("accepted", replies.queued("0ABC123"), 250, "2.0.0"),
    ("internal error", replies.INTERNAL_ERROR, 451, "4.3.0"),
    ("too many recipients", replies.TOO_MANY_RECIPIENTS, 452, "4.5.3"),
]


@pytest.mark.parametrize(("situation", "reply", "code", "status"), TABLE,
                         ids=[row[0] for row in TABLE])  # fmt: skip
def test_interface_reply_table(situation: str, reply: Reply, code: int, status: str) -> None:
    assert (reply.code, reply.status) == (code, status), situation
    assert reply.to_bytes() == f"{code} {status} {reply.text}\r\n".encode()


def test_virus_and_file_replies_name_the_thing() -> None:
    assert "Eicar-Test-Signature" in replies.virus_found("Eicar-Test-Signature").text
    text = replies.blocked_file("invoice.pdf.exe").text
    assert "invoice.pdf.exe" in text and "zip" in text


def test_queued_names_the_queue_id() -> None:
    assert replies.queued("0ABC123").line() == "250 2.0.0 Ok: queued as 0ABC123"


def test_reply_text_cannot_be_split_by_a_client_controlled_name() -> None:
    reply = replies.blocked_file("evil\r\n250 ok.exe")
    assert b"\r\n" not in reply.to_bytes()[:-2]

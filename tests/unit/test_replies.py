"""What the reply helpers build from text a client or a scanner chose: the name is kept, the
reply stays one ASCII line. (INTERFACE.md's reply table is driven situation by situation against
the live server in tests/e2e/test_reply_table.py.)"""

from __future__ import annotations

from mailgate import replies


def test_virus_and_file_replies_name_the_thing() -> None:
    assert "Eicar-Test-Signature" in replies.virus_found("Eicar-Test-Signature").text
    text = replies.blocked_file("invoice.pdf.exe").text
    assert "invoice.pdf.exe" in text and "zip" in text


def test_queued_names_the_queue_id() -> None:
    assert replies.queued("0ABC123").line() == "250 2.0.0 Ok: queued as 0ABC123"


def test_reply_text_cannot_be_split_by_a_client_controlled_name() -> None:
    reply = replies.blocked_file("evil\r\n250 ok.exe")
    assert b"\r\n" not in reply.to_bytes()[:-2]


def test_reply_bytes_are_ascii_whatever_the_name() -> None:
    reply = replies.virus_found("Win.Test.\u00e9\u4e2d")
    assert reply.to_bytes().isascii() and reply.to_bytes().endswith(b"\r\n")

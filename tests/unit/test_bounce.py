"""deliver/bounce.py: the RFC 3464 report, parsed back with the email package."""

from __future__ import annotations

import email
import email.message
from datetime import UTC, datetime

import pytest

from mailgate.deliver import bounce
from mailgate.spool.entry import Envelope, Recipient

NOW = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
ORIGINAL = (
    b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: Hi\r\n"
    b"Message-ID: <m1@example.org>\r\n\r\nBody text\r\n"
)


def envelope(**fields: object) -> Envelope:
    values: dict[str, object] = {
        "id": "Q1",
        "mail_from": "alice@example.org",
        "recipients": (Recipient("bob@example.net"),),
        "received_at": datetime(2024, 1, 1, tzinfo=UTC),
    }
    values.update(fields)
    return Envelope(**values)  # type: ignore[arg-type]  # test helper: fields by name


def failed(address: str = "bob@example.net", **fields: object) -> bounce.Notice:
    values: dict[str, object] = {
        "address": address,
        "action": "failed",
        "status": "5.1.1",
        "diagnostic": "550 5.1.1 No such user",
        "remote_mta": "mx.example.net",
        "last_attempt_at": NOW,
    }
    values.update(fields)
    return bounce.Notice(**values)  # type: ignore[arg-type]


def parts(dsn: bytes) -> list[email.message.Message]:
    msg = email.message_from_bytes(dsn)
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return [p for p in payload if isinstance(p, email.message.Message)]


def status_blocks(dsn: bytes) -> list[dict[str, str]]:
    report = parts(dsn)[1]
    payload = report.get_payload()
    assert isinstance(payload, list)
    return [
        {k: str(v) for k, v in b.items()} for b in payload if isinstance(b, email.message.Message)
    ]


def test_failure_report_structure() -> None:
    dsn = bounce.build(original=envelope(envid="E1"), message=ORIGINAL, notices=[failed()],
                       reporting_mta="mail.example.org", now=NOW)  # fmt: skip
    msg = email.message_from_bytes(dsn)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mail.example.org>"
    assert msg["To"] == "<alice@example.org>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == "<m1@example.org>"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(dsn)] == [
        "text/plain", "message/delivery-status", "message/rfc822"
    ]  # fmt: skip
    blocks = status_blocks(dsn)
    assert blocks[0] == {
        "Reporting-MTA": "dns; mail.example.org",
        "Original-Envelope-Id": "E1",
        "Arrival-Date": "Mon, 01 Jan 2024 00:00:00 +0000",
    }
    assert blocks[1] == {
        "Final-Recipient": "rfc822; bob@example.net",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.example.net",
        "Diagnostic-Code": "smtp; 550 5.1.1 No such user",
        "Last-Attempt-Date": "Tue, 02 Jan 2024 03:04:05 +0000",
    }
    # Strict CRLF everywhere.
    assert b"\n" not in dsn.replace(b"\r\n", b"")


@pytest.mark.parametrize(
    ("ret", "size", "kind"),
    [(None, 100, "message/rfc822"), ("FULL", 100, "message/rfc822"),
     ("HDRS", 100, "text/rfc822-headers"),
     (None, bounce.MAX_RETURNED_SIZE + 1, "text/rfc822-headers")],
)  # fmt: skip
def test_what_is_returned(ret: str | None, size: int, kind: str) -> None:
    message = ORIGINAL + b"x" * size
    dsn = bounce.build(original=envelope(ret=ret), message=message, notices=[failed()],
                       reporting_mta="m", now=NOW)  # fmt: skip
    assert parts(dsn)[2].get_content_type() == kind
    assert (b"Body text" in dsn) is (kind == "message/rfc822")


def test_large_original_given_as_its_header_section_returns_the_headers() -> None:
    # The engine reads only the header section of a message over MAX_RETURNED_SIZE.
    head = ORIGINAL.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    whole = bounce.build(original=envelope(), message=ORIGINAL + b"x" * bounce.MAX_RETURNED_SIZE,
                         notices=[failed()], reporting_mta="m", now=NOW)  # fmt: skip
    headers_only = bounce.build(original=envelope(), message=head, notices=[failed()],
                                reporting_mta="m", now=NOW,
                                size=bounce.MAX_RETURNED_SIZE + 1)  # fmt: skip
    assert parts(headers_only)[2].get_content_type() == "text/rfc822-headers"
    assert parts(headers_only)[2].get_payload() == parts(whole)[2].get_payload()


def test_delay_warning_returns_headers_and_retry_time() -> None:
    notice = bounce.Notice("bob@example.net", "delayed", "4.2.1", "450 4.2.1 Busy",
                           "mx.example.net", will_retry_until=NOW)  # fmt: skip
    dsn = bounce.build(original=envelope(), message=ORIGINAL, notices=[notice],
                       reporting_mta="m", now=NOW)  # fmt: skip
    assert email.message_from_bytes(dsn)["Subject"] == "Delayed Mail (still being retried)"
    assert parts(dsn)[2].get_content_type() == "text/rfc822-headers"
    assert status_blocks(dsn)[1]["Will-Retry-Until"] == "Tue, 02 Jan 2024 03:04:05 +0000"


def test_remote_reply_cannot_inject_lines() -> None:
    evil = "550 5.1.1 no\r\nX-Injected: yes\r\n\r\n--boundary"
    dsn = bounce.build(original=envelope(), message=ORIGINAL, notices=[failed(diagnostic=evil)],
                       reporting_mta="m", now=NOW)  # fmt: skip
    assert b"\r\nX-Injected" not in dsn
    assert status_blocks(dsn)[1]["Diagnostic-Code"].startswith("smtp; 550 5.1.1 no")


def test_local_diagnostic_type_and_orcpt() -> None:
    notice = failed(remote_mta="", diagnostic="550 5.1.2 Host or domain name not found",
                    status="5.1.2", orcpt="rfc822;Bob@Example.net")  # fmt: skip
    dsn = bounce.build(original=envelope(), message=ORIGINAL, notices=[notice],
                       reporting_mta="m", now=NOW)  # fmt: skip
    block = status_blocks(dsn)[1]
    assert block["Original-Recipient"] == "rfc822;Bob@Example.net"
    assert block["Diagnostic-Code"] == "X-mailgate; 550 5.1.2 Host or domain name not found"
    assert "Remote-MTA" not in block


def test_double_bounce_goes_to_the_given_recipient() -> None:
    dsn = bounce.build(original=envelope(mail_from=""), message=ORIGINAL, notices=[failed()],
                       reporting_mta="m", now=NOW, recipient="postmaster@example.org")  # fmt: skip
    report = email.message_from_bytes(dsn)
    assert report["To"] == "<postmaster@example.org>"
    # Headers only: the postmaster learns what failed, not what the sender wrote.
    assert [p.get_content_type() for p in report.walk()][-1] == "text/rfc822-headers"
    assert ORIGINAL.split(b"\r\n\r\n", 1)[1].strip() not in dsn


@pytest.mark.parametrize(
    ("line", "permanent", "status"),
    [("550 5.1.1 No", True, "5.1.1"), ("550 No such user", True, "5.0.0"),
     ("451 4.7.1 Greylisted", False, "4.7.1"), ("421 Busy", False, "4.0.0"),
     ("connection refused", False, "4.0.0"), ("", True, "5.0.0")],
)  # fmt: skip
def test_status_of(line: str, permanent: bool, status: str) -> None:
    assert bounce.status_of(line, permanent=permanent) == status


def test_needs_a_notice() -> None:
    with pytest.raises(ValueError):
        bounce.build(original=envelope(), message=ORIGINAL, notices=[], reporting_mta="m", now=NOW)

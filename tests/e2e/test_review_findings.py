"""Issue #11, class 8 against a live `mailgate serve`: the review's smaller findings, each with
the exact answer or the exact bytes that now come out.

- `mailgate queue show` renders control characters visibly (no ESC reaches the terminal);
- an EHLO name that is not a domain does not reach Received: verbatim (RFC 5321 §4.4);
- a U+2028 (or CR, LF, ESC) in a quoted SMTPUTF8 address is escaped in the log, by the log
  layer, whatever line logs it;
- recipients at address literals of special-purpose networks are refused by default
  (550 5.7.1), and accepted with `[delivery] allow_internal_literals = true`;
- an archive beyond clamd's limits is refused (554 5.7.1), not passed as clean;
- a double bounce carries the original's headers only, never its body;
- every byte of every reply is ASCII.
"""

from __future__ import annotations

import io
import re
import smtplib
import zipfile
from collections.abc import Iterator
from email import message_from_bytes
from email.message import EmailMessage, Message
from pathlib import Path

import pytest

from mailgate import replies
from tests.e2e.conftest import ALICE, message, submission
from tests.e2e.test_abuse_limits import plain
from tests.e2e.test_attacks import connect, line
from tests.support.clamd import running_clamd
from tests.support.gateway import Gateway
from tests.support.smtpsink import SmtpSink

pytestmark = pytest.mark.e2e


def smarthost_send(gw: Gateway, ehlo: bytes, mail_from: bytes, body: bytes,
                   rcpt: bytes = b"ops@remote.test") -> bytes:  # fmt: skip
    """One raw transaction on the smart host (127.0.0.1 may relay); the final reply."""
    with connect(gw.ports["smarthost"]) as c:
        assert c.cmd(b"EHLO " + ehlo).startswith(b"250"), ehlo
        assert c.cmd(
            b"MAIL FROM:<" + mail_from + b">" + (b" SMTPUTF8" if not mail_from.isascii() else b"")
        ) == line(replies.SENDER_OK)
        assert c.cmd(b"RCPT TO:<" + rcpt + b">") == line(replies.RECIPIENT_OK)
        assert c.cmd(b"DATA") == line(replies.START_DATA)
        return c.cmd(body + b"\r\n.")


def qid_of(reply: bytes) -> str:
    assert reply.startswith(b"250 2.0.0 Ok: queued as "), reply
    return reply.rsplit(b" ", 1)[1].strip().decode()


# --- the operator's terminal ----------------------------------------------------------------


def test_queue_show_renders_escape_sequences_visibly(gateway: Gateway) -> None:
    evil = "\x1b]0;owned\x07\x1b[2J\x1b[1;31mURGENT\x9b0m"
    client = submission(gateway)
    client.sendmail("alice@example.org", ["someone@remote.test"], message(subject=evil))
    client.quit()
    [qid] = gateway.queued()
    shown = gateway.cli("queue", "show", qid).stdout
    assert "\x1b" not in shown and "\x07" not in shown and "\x9b" not in shown
    assert "Subject: \\x1b]0;owned\\x07\\x1b[2J\\x1b[1;31mURGENT\\x9b0m" in shown
    listed = gateway.cli("queue", "list").stdout
    assert "\x1b" not in listed


# --- Received: -------------------------------------------------------------------------------

EHLO_CASES = [  # (EHLO argument, what Received: says after "from")
    (b"x;by.mail.example.org", b"[127.0.0.1]"),
    (b"evil.example;by", b"[127.0.0.1]"),
    (b"a(b)c", b"[127.0.0.1]"),
    (b"[127.0.0.1];by", b"[127.0.0.1]"),
    (b"lab.example.org.", b"[127.0.0.1]"),
    (b"lab.example.org", b"lab.example.org"),
    (b"[192.0.2.7]", b"[192.0.2.7]"),
]


def test_an_ehlo_name_that_is_no_domain_does_not_reach_received(gateway: Gateway) -> None:
    for ehlo, written in EHLO_CASES:
        reply = smarthost_send(gateway, ehlo, b"cron@lab.test", b"Subject: hi\r\n\r\nhello")
        received = gateway.message(qid_of(reply)).split(b"\r\n\t", 1)[0]
        assert received == b"Received: from " + written + b" ([127.0.0.1])", ehlo


# --- the log ---------------------------------------------------------------------------------


def test_separators_in_a_smtputf8_address_are_escaped_in_the_log(gateway: Gateway) -> None:
    fake = " 2026-12-03 08:00:00,000 INFO mailgate[1] mailgate.accept: qid=FAKE accepted "
    # Line and paragraph separators (fake lines), bidi overrides and marks (text that reads
    # differently than it is): all allowed in a quoted SMTPUTF8 local part (RFC 6531 §3.3).
    for sep in ["\u2028", "\u2029", "\u202e", "\u200e"]:
        local = f'"cron{sep}{fake}"'
        reply = smarthost_send(gateway, b"lab.test", f"{local}@lab.test".encode(),
                               b"Subject: hi\r\n\r\nhello")  # fmt: skip
        assert reply.startswith(b"250 "), reply
    text = gateway.log_text()
    for raw in ["\u2028", "\u2029", "\u202e", "\u200e"]:
        assert raw not in text, repr(raw)
    for shown in ["\\u2028", "\\u2029", "\\u202e", "\\u200e"]:
        assert f'from=<"cron{shown}{fake}"@lab.test>' in text, shown
    # Every log line is one event: no line of the log starts with the forged prefix.
    assert not re.search(r"^ 2026-12-03 08:00:00", text, re.M)


# --- address literals ------------------------------------------------------------------------

LITERALS = [  # (recipient, refused by default)
    (b"x@[127.0.0.1]", True),
    (b"x@[10.1.2.3]", True),
    (b"x@[172.16.0.1]", True),
    (b"x@[192.168.1.1]", True),
    (b"x@[169.254.169.254]", True),  # link-local: cloud metadata
    (b"x@[100.64.0.1]", True),  # shared address space (CGN)
    (b"x@[0.0.0.0]", True),
    (b"x@[240.0.0.1]", True),  # reserved
    (b"x@[224.0.0.1]", True),  # multicast
    (b"x@[IPv6:::1]", True),
    (b"x@[IPv6:fe80::1]", True),
    (b"x@[IPv6:fd00::1]", True),
    (b"x@[IPv6:::ffff:10.1.2.3]", True),  # IPv4-mapped
    (b"x@[IPv6:2002:a01:203::1]", True),  # 6to4 of 10.1.2.3
    (b"x@[IPv6:64:ff9b::a01:203]", True),  # NAT64 of 10.1.2.3
    (b"x@[8.8.8.8]", False),
    (b"x@[IPv6:2a00:1450:4001:81b::200e]", False),
    (b"x@remote.test", False),
]


def rcpt_answers(gw: Gateway) -> dict[bytes, bytes]:
    """Each recipient's RCPT answer on the smart host and on 465 (which must agree), three
    recipients per connection (a session's error budget would close it after a few 5xx)."""
    answers = {}
    rcpts = [rcpt for rcpt, _ in LITERALS]
    for start in range(0, len(rcpts), 3):
        with (
            connect(gw.ports["smarthost"]) as smarthost,
            connect(gw.ports["submissions"], tls=True) as submissions,
        ):
            smarthost.cmd(b"EHLO lab.test")
            assert smarthost.cmd(b"MAIL FROM:<cron@lab.test>") == line(replies.SENDER_OK)
            submissions.cmd(b"EHLO client.test")
            assert submissions.cmd(plain(*ALICE)) == line(replies.AUTH_SUCCEEDED)
            assert submissions.cmd(b"MAIL FROM:<alice@example.org>") == line(replies.SENDER_OK)
            for rcpt in rcpts[start : start + 3]:
                a = smarthost.cmd(b"RCPT TO:<" + rcpt + b">")
                b = submissions.cmd(b"RCPT TO:<" + rcpt + b">")
                assert a == b, rcpt
                answers[rcpt] = a
    return answers


def test_address_literals_of_internal_networks_are_refused_by_default(gateway: Gateway) -> None:
    answers = rcpt_answers(gateway)
    for rcpt, refused in LITERALS:
        expected = replies.RELAY_TO_INTERNAL_DENIED if refused else replies.RECIPIENT_OK
        assert answers[rcpt] == line(expected), rcpt


def test_the_operator_can_allow_internal_literals(tmp_path: Path) -> None:
    gw = Gateway(tmp_path / "gw", {"delivery": {"allow_internal_literals": True}})
    gw.add_user(*ALICE)
    gw.start("--no-delivery")
    try:
        answers = rcpt_answers(gw)
    finally:
        gw.finish()
    assert set(answers.values()) == {line(replies.RECIPIENT_OK)}


# --- clamd's limits --------------------------------------------------------------------------


def nested_zip(depth: int, payload: bytes) -> bytes:
    data, name = payload, "report.txt"
    for level in range(depth):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), data)
        data, name = buf.getvalue(), f"level{level}.zip"
    return data


def with_attachment(filename: str, payload: bytes) -> bytes:
    msg = EmailMessage()
    msg["From"] = "alice@example.org"
    msg["To"] = "someone@remote.test"
    msg["Subject"] = "archive"
    msg.set_content("See attached.\n")
    msg.add_attachment(payload, maintype="application", subtype="zip", filename=filename)
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@pytest.fixture
def limited_clamd_gateway(tmp_path: Path) -> Iterator[Gateway]:
    settings = {"MaxRecursion": "3", "MaxFileSize": "20000", "MaxFiles": "5"}
    with running_clamd(tmp_path / "c", settings=settings) as clamd:
        gw = Gateway(tmp_path / "gw", {"scanner": {"clamd": clamd.tcp_spec}})
        gw.add_user(*ALICE)
        gw.start("--no-delivery")
        try:
            yield gw
        finally:
            gw.finish()


def test_archives_beyond_clamds_limits_are_refused_not_passed_clean(
    limited_clamd_gateway: Gateway,
) -> None:
    gw = limited_clamd_gateway
    many = io.BytesIO()
    with zipfile.ZipFile(many, "w") as z:
        for n in range(20):
            z.writestr(zipfile.ZipInfo(f"f{n}.txt", date_time=(2026, 1, 1, 0, 0, 0)), b"x" * 10)
    cases = {
        "deep.zip": nested_zip(8, b"hello"),  # nesting beyond MaxRecursion
        "big.zip": nested_zip(1, b"A" * 100_000),  # a member beyond MaxFileSize
        "many.zip": many.getvalue(),  # more members than MaxFiles
    }
    for name, archive in cases.items():
        client = submission(gw)
        with pytest.raises(smtplib.SMTPDataError) as e:
            client.sendmail("alice@example.org", ["someone@remote.test"],
                            with_attachment(name, archive))  # fmt: skip
        client.close()
        assert (e.value.smtp_code, e.value.smtp_error) == (
            replies.UNSCANNABLE_ARCHIVE.code,
            f"{replies.UNSCANNABLE_ARCHIVE.status} {replies.UNSCANNABLE_ARCHIVE.text}".encode(),
        ), name
    assert gw.queued() == []
    assert gw.log_text().count("scan verdict=unscannable name=Heuristics.Limits.Exceeded.") == 3
    # An archive within the limits is scanned and accepted.
    client = submission(gw)
    client.sendmail("alice@example.org", ["someone@remote.test"],
                    with_attachment("ok.zip", nested_zip(2, b"hello")))  # fmt: skip
    client.quit()
    assert len(gw.queued()) == 1


# --- double bounces --------------------------------------------------------------------------


def test_a_double_bounce_carries_the_headers_only(tmp_path: Path) -> None:
    with SmtpSink(host="127.0.0.1", port=0) as sink:
        sink.behaviour.rcpt_for["nobody@remote.test"] = "550 5.1.1 No such user"
        gw = Gateway(tmp_path / "gw", {"delivery": {"relay": f"127.0.0.1:{sink.port}"}})
        gw.start()
        try:
            body = b"Subject: private\r\nX-Trace: kept\r\n\r\nthe confidential body line"
            reply = smarthost_send(gw, b"lab.test", b"", body, rcpt=b"nobody@remote.test")
            assert reply.startswith(b"250 "), reply
            [notice] = sink.wait_for(1, timeout=30)
        finally:
            gw.finish()
    assert notice.mail_from == "" and notice.rcpt_to == ("postmaster@example.org",)
    assert b"the confidential body line" not in notice.message
    report = message_from_bytes(notice.message)
    payload = report.get_payload()
    assert isinstance(payload, list)
    parts = [p.get_content_type() for p in payload if isinstance(p, Message)]
    assert parts == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert b"X-Trace: kept" in notice.message


# --- reply text is ASCII ---------------------------------------------------------------------


def test_every_reply_byte_is_ascii(gateway: Gateway) -> None:
    seen = b""
    # A blocked attachment with a non-ASCII name, a bare LF in DATA, an unknown command with
    # 8-bit bytes, an SMTPUTF8 address: replies that quote the client or cite an RFC.
    with connect(gateway.ports["submissions"], tls=True) as c:
        seen += c.greeting + c.cmd(b"EHLO client.test") + c.cmd(plain(*ALICE))
        seen += c.cmd(b"MAIL FROM:<alice@example.org> SMTPUTF8")
        seen += c.cmd("RCPT TO:<j\u00fcrgen@b\u00fccher.example>".encode())
        seen += c.cmd(b"DATA")
        attachment = with_attachment("r\u00e9sum\u00e9 \u2028\u00fcber.exe", b"MZ\0\0")
        reply = c.cmd(attachment + b"\r\n.")
        assert reply.startswith(b"554 5.7.1 Message rejected: attachment 'r?sum? ??ber.exe'")
        seen += reply
        seen += c.cmd("VRFY j\u00fcrgen".encode()) + c.cmd("\u00fcnknown".encode())
    with connect(gateway.ports["smarthost"]) as c:
        seen += c.greeting + c.cmd(b"EHLO lab.test") + c.cmd(b"MAIL FROM:<cron@lab.test>")
        seen += c.cmd(b"RCPT TO:<ops@remote.test>") + c.cmd(b"DATA")
        c.send(b"Subject: x\r\n\r\nbare\nLF\r\n.\r\n")
        reply = c.reply()
        assert reply == line(replies.SMUGGLING)
        seen += reply + (c.rest() or b"")
    assert seen.isascii(), [ln for ln in seen.split(b"\r\n") if not ln.isascii()]

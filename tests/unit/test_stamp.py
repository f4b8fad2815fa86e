"""Header reading and the headers mailgate adds."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.message import stamp
from mailgate.values import Trace, with_keyword


def test_received_header_names_everything() -> None:
    trace = Trace("client.test", "192.0.2.1", "", "submission", 587, "ESMTPSA",
                        "TLSv1.3:TLS_AES_256_GCM_SHA384", "alice", "PLAIN")  # fmt: skip
    when = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    out = stamp.received(trace, hostname="mail.example.org", qid="0ABC", recipients=["x@y.test"],
                         now=when)  # fmt: skip
    assert out == (
        b"Received: from client.test ([192.0.2.1])\r\n"
        b"\tby mail.example.org (mailgate submission port 587)\r\n"
        b"\twith ESMTPSA id 0ABC\r\n"
        b"\t(TLSv1.3:TLS_AES_256_GCM_SHA384) (PLAIN:alice)\r\n"
        b"\tfor <x@y.test>;\r\n"
        b"\tSat, 28 Nov 2026 12:00:00 +0000\r\n"
    )


def test_received_hides_recipients_when_several_and_quotes_ipv6() -> None:
    trace = Trace("h", "2001:db8::1", "", "smarthost", 25, "ESMTP", "", None, None)
    out = stamp.received(trace, hostname="m", qid="Q", recipients=["a@x", "b@x"])
    assert b"[IPv6:2001:db8::1]" in out and b" for " not in out


def test_with_keywords_rfc3848() -> None:
    assert with_keyword(extended=True, tls=True, authenticated=True) == "ESMTPSA"
    assert with_keyword(extended=True, tls=True, authenticated=False) == "ESMTPS"
    assert with_keyword(extended=True, tls=False, authenticated=True) == "ESMTPA"
    assert with_keyword(extended=True, tls=False, authenticated=False) == "ESMTP"
    assert with_keyword(extended=False, tls=False, authenticated=False) == "SMTP"


@given(st.text(max_size=80))
def test_client_helo_cannot_break_the_received_header(helo: str) -> None:
    trace = Trace(helo, "192.0.2.1", "", "smarthost", 25, "ESMTP", "", None, None)
    out = stamp.received(trace, hostname="m", qid="Q", recipients=["a@x"])
    lines = out.split(b"\r\n")
    assert lines[0].startswith(b"Received: from ")
    assert all(line.startswith(b"\t") for line in lines[1:-1])
    assert lines[-1] == b""
    # RFC 5321 §4.4: the from clause is one Domain or address literal, then our TCP-info.
    assert lines[0].split(b" ")[3:] == [b"([192.0.2.1])"]
    assert out.count(b";") == 1 and lines[1].startswith(b"\tby m ")


@pytest.mark.parametrize(
    ("helo", "written"),
    [
        ("client.example.org", "client.example.org"),
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"),
        ("x; by trusted.example.ac.uk with ESMTPSA", "[192.0.2.1]"),
        ("evil;by.example", "[192.0.2.1]"),
        ("a..b", "[192.0.2.1]"),
        ("-bad.example", "[192.0.2.1]"),
        ("[IPv6:192.0.2.1]", "[192.0.2.1]"),
        ("[300.1.1.1]", "[192.0.2.1]"),
        ("", "[192.0.2.1]"),
    ],
)
def test_an_ehlo_name_that_is_not_a_domain_is_replaced_by_the_address(
    helo: str, written: str
) -> None:
    trace = Trace(helo, "192.0.2.1", "", "submission", 587, "ESMTPSA", "", "alice", "PLAIN")
    out = stamp.received(trace, hostname="mail.example.org", qid="Q", recipients=["a@x"])
    assert out.startswith(f"Received: from {written} ([192.0.2.1])\r\n".encode())


@given(st.text(alphabet=st.sampled_from("ab ()\\<>\r\n\x00\u2028é@."), max_size=30) | st.text())
def test_the_fast_paths_keep_every_character_rule(text: str) -> None:
    # Issue #19: one C-level scan for the usual text; the rules are the per-character ones.
    printable = "".join(c for c in text if c.isprintable())[:200]
    assert stamp.scanned_by(text) == f"X-Scanned-By: {printable}\r\n".encode()
    kept = "".join(c for c in text if c.isprintable() and c not in "()\\")[:200]
    assert stamp._comment_safe(text) == kept
    assert stamp._path_safe(text) == all(c.isprintable() and c not in "<>\r\n" for c in text)

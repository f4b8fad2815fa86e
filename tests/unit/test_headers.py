"""The one parse of the header section, the strict author reader and the domain rule (issue #11).

Plain function calls: message.headers.parse/read, message.authors.read_authors,
identity.normalize, and the policy's use of them over an in-memory directory.
"""

from __future__ import annotations

import io
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate import replies
from mailgate.errors import Rejected
from mailgate.identity import BadDomain, normalize
from mailgate.message import headers
from mailgate.message.authors import read_authors
from mailgate.policy import Policy, Sender
from tests.support.memdir import MemoryDirectory

# --- the header section -------------------------------------------------------------------


def test_fields_raw_bytes_and_body_offset() -> None:
    message = b"From: a@b.test\r\nSubject: one\r\n two\r\n\r\nbody\r\n"
    section = headers.parse(message)
    assert [(f.name, f.value) for f in section.fields] == [
        ("From", b" a@b.test\r\n"),
        ("Subject", b" one\r\n two\r\n"),
    ]
    assert section.raw == message[: len(section.raw)] and section.separated
    assert message[section.body_offset :] == b"body\r\n"
    assert section.fields[1].text() == "one two"


@pytest.mark.parametrize(
    ("line", "what"),
    [
        (b"Content-Type : text/plain", "white space between the field name 'Content-Type' and"),
        (b"From\t: a@b.test", "white space between the field name 'From' and its colon"),
        (b"From a@b.test Thu Dec  3 08:00:00 2026", "an mbox 'From ' line"),
    ],
)
def test_lines_that_some_reader_takes_for_a_field_are_refused(line: bytes, what: str) -> None:
    with pytest.raises(Rejected) as e:
        headers.parse(b"Subject: x\r\n" + line + b"\r\n\r\nbody\r\n")
    assert (e.value.reply.code, e.value.reply.status) == (554, "5.6.0")
    assert what in e.value.reply.text


def test_a_leading_continuation_line_is_refused() -> None:
    with pytest.raises(Rejected) as e:
        headers.parse(b" folded\r\nSubject: x\r\n\r\n")
    assert e.value.reply.line() == (
        "554 5.6.0 Malformed message header: the first header line is a continuation line"
    )


def test_a_header_without_its_empty_line_ends_at_the_first_line_that_is_no_field() -> None:
    message = b"Subject: x\r\nHello there.\r\n"
    section = headers.parse(message)
    assert not section.separated and message[section.body_offset :] == b"Hello there.\r\n"
    assert headers.parse(b"Subject: x\r\n").body_offset == len(b"Subject: x\r\n")


def test_the_limit_is_the_whole_section_and_is_refused_with_552() -> None:
    field = b"X-Pad: " + b"p" * 93 + b"\r\n"  # 102 bytes
    assert len(headers.parse(field * 10 + b"\r\nb", limit=1020).fields) == 10
    with pytest.raises(Rejected) as e:
        headers.parse(field * 11 + b"\r\nb", limit=1020)
    assert e.value.reply == replies.header_too_big(1020)
    assert e.value.reply.line() == "552 5.3.4 Message header section too big (limit 1020 bytes)"


def test_read_takes_only_the_header_from_a_stream() -> None:
    message = b"Subject: x\r\n\r\n" + b"b" * 500_000

    class Counting(io.BytesIO):
        taken = 0

        def read(self, size: int | None = -1) -> bytes:
            data = super().read(size)
            Counting.taken += len(data)
            return data

    section = headers.read(Counting(message))
    assert section.body_offset == 14 and Counting.taken <= 64 * 1024


def test_without_and_prepend_keep_the_offsets_true() -> None:
    message = b"Sender: x@y.test\r\nSubject: s\r\n\r\nbody"
    section = headers.parse(message)
    trimmed = section.without("sender")
    rebuilt = trimmed.raw + message[len(section.raw) :]
    assert rebuilt[trimmed.body_offset :] == b"body"
    stamped = trimmed.prepend(b"Received: by us\r\n")
    assert [f.key for f in stamped.fields] == ["received", "subject"]
    assert (b"Received: by us\r\n" + rebuilt)[stamped.body_offset :] == b"body"


# --- the domain rule ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "normal"),
    [
        ("example.org", "example.org"),
        ("EXAMPLE.Org", "example.org"),
        ("example\u3002org", "example.org"),
        ("example\uff0eorg", "example.org"),
        ("ｅｘａｍｐｌｅ.org", "example.org"),
        ("example.org\u200b", "example.org"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
        ("r3---sn-abc.example", "r3---sn-abc.example"),
    ],
)
def test_normalize(written: str, normal: str) -> None:
    assert normalize(written) == normal


@pytest.mark.parametrize(
    "written",
    ["", "example.org.", "example..org", "example.org\u3002", "straße.example", "ex_ample.org",
     "-x.example", "xn--abc.example", "a" * 64 + ".example", '"example.org"'],
)  # fmt: skip
def test_normalize_refuses(written: str) -> None:
    with pytest.raises(BadDomain):
        normalize(written)


# --- the strict author reader ------------------------------------------------------------------


def authors_of(*fields: str) -> list[tuple[str, list[str], list[str]]]:
    section = headers.parse("".join(f + "\r\n" for f in fields).encode() + b"\r\nbody")
    return [
        (a.name, [m.address for m in a.mailboxes], [m.address for m in a.shown])
        for a in read_authors(section)
    ]


def test_what_the_reader_returns() -> None:
    assert authors_of(
        "From: John Q. Public <john@Example.org>, ann@bücher.example",
        'Sender: "dean@college.example.org" <alice@example.org>',
        "Resent-From: x@y.test (ceo＠example\u3002org)",
        "Resent-From: z@y.test",
    ) == [
        ("From", ["john@example.org", "ann@xn--bcher-kva.example"], []),
        ("Sender", ["alice@example.org"], ["dean@college.example.org"]),
        ("Resent-From", ["x@y.test"], ["ceo@example.org"]),
        ("Resent-From", ["z@y.test"], []),
    ]


@pytest.mark.parametrize(
    ("field", "why"),
    [
        ("From: =?utf-8?q?a=40example.org?=", "an encoded word (RFC 2047) instead of an address"),
        ("From: =?utf-8?q?x?=@example.org", "an encoded word (RFC 2047) inside an address"),
        ("From: x <=?utf-8?q?a?=@example.org>", "an encoded word (RFC 2047) inside an address"),
        ("From: =?x-unknown?q?a?= <a@example.org>", "an encoded word (RFC 2047) that cannot be"),
        ('From: a@"example.org"', "a quoted domain"),
        ("From: a@[192.0.2.1]", "a domain literal"),
        ("From: a@example.org.", "an empty part in the domain"),
        ("From: a@ex ample.org", "unexpected 'a' after the address"),
        ("From: g: a@example.org;", "a group"),
        ("Sender: a@example.org, b@example.org", "more than one address"),
        ("From: <a@example.org", "without its closing '>'"),
        ("From: a@example.org (open", "an unclosed comment"),
        ("From:  ", "no address"),
        ("From: a@\x01example.org", "a control character"),
    ],
)
def test_the_reader_refuses(field: str, why: str) -> None:
    with pytest.raises(Rejected) as e:
        authors_of(field)
    assert (e.value.reply.code, e.value.reply.status) == (554, "5.6.0")
    assert why in e.value.reply.text, e.value.reply.text
    assert e.value.reply.text.isascii()


def test_non_utf8_octets_are_refused() -> None:
    with pytest.raises(Rejected) as e:
        read_authors(headers.parse(b"From: a@\xffexample.org\r\n\r\n"))
    assert "octets that are not UTF-8" in e.value.reply.text


# --- the policy over them ----------------------------------------------------------------------


@pytest.fixture
def policy() -> Policy:
    d = MemoryDirectory("example.org")
    d.add_user("alice", "", "pw")
    d.add_domain("college.example.org")
    d.add_domain("xn--bcher-kva.example")
    d.grant("bursar@college.example.org", "alice")
    return Policy(d, smarthost_networks=[ipaddress.ip_network("10.0.0.0/8")],
                  foreign_subdomains=["lists.example.org"])  # fmt: skip


ALICE = Sender("submission", "192.0.2.1", "alice")


@pytest.mark.parametrize(
    ("domain", "ours"),
    [("example.org", True), ("hr.example.org", True), ("a.b.college.example.org", True),
     ("lists.example.org", False), ("x.lists.example.org", False), ("xample.org", False),
     ("example.org.evil.test", False), ("sub.xn--bcher-kva.example", True)],
)  # fmt: skip
def test_subdomains_are_the_institutions_except_the_listed(
    policy: Policy, domain: str, ours: bool
) -> None:
    assert policy.is_institution(domain) is ours


@pytest.mark.parametrize(
    "address", ["x@sub.example.org", "x@SUB.example.org", "x@hr.college.example.org",
                "x@sub.bücher.example", "bursar@college\u3002example.org"],
)  # fmt: skip
def test_mail_from(policy: Policy, address: str) -> None:
    if address.startswith("bursar@"):
        assert policy.check_sender(ALICE, address) == address  # hers, however spelt
        return
    with pytest.raises(Rejected) as e:
        policy.check_sender(ALICE, address)
    assert e.value.reply == replies.SENDER_NOT_ALLOWED


def test_mail_from_that_no_receiver_reads_as_ours_is_rewritten(policy: Policy) -> None:
    assert policy.check_sender(ALICE, "x@[192.0.2.1]") == "alice@example.org"
    assert policy.check_sender(ALICE, "x@lists.example.org") == "alice@example.org"


@pytest.mark.parametrize(
    ("fields", "reply"),
    [
        (["From: alice@example.org", "Sender: bob@example.org"],
         "553 5.7.1 Sender address not allowed for this login"),
        (["From: alice@example.org", "Resent-From: x@hr.example.org"],
         "553 5.7.1 Resent-From address not allowed for this login"),
        (["From: alice@example.org", "Resent-Sender: dean@bücher.example"],
         "553 5.7.1 Resent-Sender address not allowed for this login"),
        (['From: "dean@college.example.org" <alice@example.org>'],
         "553 5.7.1 Sender address not allowed for this login"),
    ],
)  # fmt: skip
def test_identity_fields(policy: Policy, fields: list[str], reply: str) -> None:
    section = headers.parse("".join(f + "\r\n" for f in fields).encode() + b"\r\n")
    with pytest.raises(Rejected) as e:
        policy.check_identity(ALICE, read_authors(section))
    assert e.value.reply.line() == reply


def test_a_foreign_sender_or_resent_field_gets_our_stamp_and_no_signature(policy: Policy) -> None:
    section = headers.parse(b"From: bursar@college.example.org\r\nSender: x@gmail.test\r\n\r\n")
    decision = policy.check_identity(ALICE, read_authors(section))
    assert (decision.sender_header, decision.sign_domain) == ("alice@example.org", None)
    own = headers.parse(b"From: bursar@college.example.org\r\nSender: alice@example.org\r\n\r\n")
    decision = policy.check_identity(ALICE, read_authors(own))
    assert (decision.sender_header, decision.sign_domain) == (None, "college.example.org")


def test_the_ascii_atext_run_is_exactly_the_atext_set() -> None:
    # The atom reader takes ASCII runs with a regular expression (issue #19): same set.
    from mailgate.message import authors

    for code in range(128):
        ch = chr(code)
        matched = authors._ASCII_ATEXT_RUN.fullmatch(ch) is not None
        assert matched == (ch in authors._ATEXT_ASCII), repr(ch)


@given(st.text(alphabet=st.sampled_from('ab.-_+é中 \t<>@"(),;:\u00a0\u2028\x7f'), max_size=20))
def test_the_atom_reader_stops_where_the_per_character_rule_does(text: str) -> None:
    from mailgate.message import authors

    parser = authors._Parser(text)
    end = 0
    while end < len(text) and authors._is_atext(text[end]):
        end += 1
    assert parser.atom() == text[:end] and parser.i == end

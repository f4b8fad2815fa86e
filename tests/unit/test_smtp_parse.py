"""mailgate.smtp.parse: paths, ESMTP parameters, xtext, EHLO names and SASL, as plain functions.

Every refusal is checked for its exact reply (code and enhanced status). Property tests: valid
addresses built from the RFC 5321 grammar are accepted unchanged; no accepted address ever
contains CR, LF, "<" or ">"; arbitrary text never raises anything but ProtocolViolation.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate import replies
from mailgate.errors import ProtocolViolation
from mailgate.replies import Reply
from mailgate.smtp import parse
from mailgate.smtp.events import MailFrom, RcptTo


def refusal(reply: Reply) -> tuple[int, str]:
    return reply.code, reply.status


def reply_of(exc: pytest.ExceptionInfo[ProtocolViolation]) -> tuple[int, str]:
    return exc.value.reply.code, exc.value.reply.status


# --- paths --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("<alice@example.org>", "alice@example.org"),
        ("<first.last+tag@sub.example.org>", "first.last+tag@sub.example.org"),
        ("<!#$%&'*+-/=?^_`{|}~@example.org>", "!#$%&'*+-/=?^_`{|}~@example.org"),
        ('<"john doe"@example.org>', '"john doe"@example.org'),
        ('<"a\\"b"@example.org>', '"a\\"b"@example.org'),
        ('<""@example.org>', '""@example.org'),
        ("<user@[192.0.2.1]>", "user@[192.0.2.1]"),
        ("<user@[IPv6:2001:db8::1]>", "user@[IPv6:2001:db8::1]"),
        ("<user@[ipv6:::1]>", "user@[ipv6:::1]"),
        ("<@relay.test:user@example.org>", "user@example.org"),
        ("<@a.test,@b.test:user@example.org>", "user@example.org"),
        ("<u@x-y.example>", "u@x-y.example"),
        ("<u@123.example>", "u@123.example"),
    ],
)
def test_valid_paths(text: str, address: str) -> None:
    found, rest = parse.parse_path(
        text + " X=1", allow_null=False, allow_postmaster=False, smtputf8=False
    )
    assert (found, rest) == (address, " X=1")


@pytest.mark.parametrize(
    "text",
    [
        "<>",
        "<alice>",
        "<alice@>",
        "<@example.org>",
        "<alice@@example.org>",
        "<a..b@example.org>",
        "<.a@example.org>",
        "<a.@example.org>",
        "<a b@example.org>",
        "<a@-example.org>",
        "<a@example-.org>",
        "<a@example..org>",
        "<a@example.org.>",
        "<a@exa_mple.org>",
        "<a@[300.0.0.1]>",
        "<a@[192.0.2.01]>",
        "<a@[IPv6:fe80::1%eth0]>",
        "<a@[IPv6:not-an-address]>",
        "<a@[tag:general]>",
        '<"a<b"@example.org>',
        '<"a\\>b"@example.org>',
        '<"unterminated@example.org>',
        "<a@example.org",
        "<a\r@example.org>",
        "<a@" + "x" * 64 + ".org>",
        "<a@" + ".".join(["abcdefghi"] * 26) + ">",
        "<" + "a" * 250 + "@example.org>",
        "<@relay:>",
    ],
)
def test_bad_addresses_are_501_5_1_3(text: str) -> None:
    with pytest.raises(ProtocolViolation) as exc:
        parse.parse_path(text, allow_null=False, allow_postmaster=False, smtputf8=False)
    assert reply_of(exc) == refusal(replies.BAD_ADDRESS)


@pytest.mark.parametrize("text", ["alice@example.org", "", "FROM:<a@b>", " <a@b.c>"])
def test_missing_brackets_are_501_5_5_4(text: str) -> None:
    with pytest.raises(ProtocolViolation) as exc:
        parse.parse_path(text, allow_null=True, allow_postmaster=True, smtputf8=False)
    assert reply_of(exc) == refusal(replies.BAD_ARGUMENTS)


def test_null_path_only_where_allowed() -> None:
    assert parse.parse_path("<>", allow_null=True, allow_postmaster=False, smtputf8=False) == (
        "",
        "",
    )
    with pytest.raises(ProtocolViolation) as exc:
        parse.parse_path("<>", allow_null=False, allow_postmaster=True, smtputf8=False)
    assert reply_of(exc) == refusal(replies.BAD_ADDRESS)


@pytest.mark.parametrize("text", ["<postmaster>", "<Postmaster>", "<POSTMASTER>"])
def test_bare_postmaster_is_normalised(text: str) -> None:
    assert parse.parse_path(text, allow_null=False, allow_postmaster=True, smtputf8=False) == (
        "postmaster",
        "",
    )
    with pytest.raises(ProtocolViolation):
        parse.parse_path(text, allow_null=True, allow_postmaster=False, smtputf8=False)


def test_utf8_address_needs_smtputf8() -> None:
    with pytest.raises(ProtocolViolation) as exc:
        parse.parse_path("<jörg@exämple.org>", allow_null=False, allow_postmaster=False,
                         smtputf8=False)  # fmt: skip
    assert reply_of(exc) == refusal(replies.UTF8_NOT_REQUESTED)
    found, _ = parse.parse_path(
        "<jörg@exämple.org>", allow_null=False, allow_postmaster=False, smtputf8=True
    )
    assert found == "jörg@exämple.org"


def test_undecodable_bytes_never_match() -> None:
    text = b"<j\xffrg@example.org>".decode("utf-8", "surrogateescape")
    with pytest.raises(ProtocolViolation) as exc:
        parse.parse_path(text, allow_null=False, allow_postmaster=False, smtputf8=True)
    assert reply_of(exc) == refusal(replies.BAD_ADDRESS)


def test_path_of_256_octets_is_the_limit() -> None:
    local = "a" * (256 - len("<@example.org>"))
    assert parse.is_valid_address(f"{local}@example.org")
    assert not parse.is_valid_address(f"{local}a@example.org")


# --- MAIL / RCPT arguments ----------------------------------------------------------------------
def test_mail_with_every_parameter() -> None:
    event = parse.parse_mail_args(
        "FROM:<a@example.org> SIZE=1000 BODY=8bitmime SMTPUTF8 RET=hdrs ENVID=QQ+2B1 AUTH=<>"
    )
    assert event == MailFrom(address="a@example.org", size=1000, body="8BITMIME", smtputf8=True,
                             ret="HDRS", envid="QQ+1", auth="<>")  # fmt: skip


@pytest.mark.parametrize("arg", ["FROM: <a@example.org>", "from:<a@example.org>",
                                 "FROM:  <a@example.org>  SIZE=5 "])  # fmt: skip
def test_mail_tolerates_spaces_and_case(arg: str) -> None:
    assert parse.parse_mail_args(arg).address == "a@example.org"


@pytest.mark.parametrize(
    ("arg", "reply"),
    [
        ("FROM <a@example.org>", replies.BAD_ARGUMENTS),
        ("TO:<a@example.org>", replies.BAD_ARGUMENTS),
        ("FROM:a@example.org", replies.BAD_ARGUMENTS),
        ("FROM:<a@example.org>SIZE=1", replies.BAD_ARGUMENTS),
        ("FROM:<a@example.org> SIZE=abc", replies.BAD_ARGUMENTS),
        ("FROM:<a@example.org> SIZE=" + "9" * 21, replies.BAD_ARGUMENTS),
        ("FROM:<a@example.org> SIZE", replies.BAD_ARGUMENTS),
        ("FROM:<a@example.org> SIZE=1 SIZE=2", replies.BAD_ARGUMENTS),
        ("FROM:<a@example.org> BODY=9BIT", replies.BAD_ARGUMENTS),
        ("FROM:<a@example.org> BODY=BINARYMIME", replies.PARAM_NOT_RECOGNIZED),
        ("FROM:<a@example.org> SMTPUTF8=yes", replies.BAD_ARGUMENTS),
        ("FROM:<a@example.org> RET=ALL", replies.BAD_ARGUMENTS),
        ("FROM:<a@example.org> ENVID=a+ZZ", replies.BAD_ARGUMENTS),
        ("FROM:<a@example.org> ENVID=a+0D+0A", replies.BAD_ARGUMENTS),
        ("FROM:<a@example.org> ENVID=" + "x" * 101, replies.BAD_ARGUMENTS),
        ("FROM:<a@example.org> NOTIFY=NEVER", replies.PARAM_NOT_RECOGNIZED),
        ("FROM:<a@example.org> X-FOO=1", replies.PARAM_NOT_RECOGNIZED),
        ("FROM:<a@example.org> =1", replies.BAD_ARGUMENTS),
        ("FROM:<a@example.org> A=b=c", replies.BAD_ARGUMENTS),
        ("FROM:<a@example.org> X=é", replies.BAD_ARGUMENTS),
        ("FROM:<a@bad_domain.org>", replies.BAD_ADDRESS),
        ("FROM:<jörg@example.org>", replies.UTF8_NOT_REQUESTED),
        ('FROM:<"x SMTPUTF8 ö"@example.org>', replies.UTF8_NOT_REQUESTED),
    ],
)
def test_mail_refusals(arg: str, reply: Reply) -> None:
    with pytest.raises(ProtocolViolation) as exc:
        parse.parse_mail_args(arg)
    assert reply_of(exc) == refusal(reply)


def test_rcpt_with_dsn_parameters() -> None:
    event = parse.parse_rcpt_args(
        "TO:<b@example.org> NOTIFY=success,Delay ORCPT=rfc822;b+40example.org", smtputf8=False
    )
    assert event == RcptTo(address="b@example.org", notify=("SUCCESS", "DELAY"),
                           orcpt="rfc822;b@example.org")  # fmt: skip
    assert parse.parse_rcpt_args("TO:<b@x.org> NOTIFY=NEVER", smtputf8=False).notify == ("NEVER",)


@pytest.mark.parametrize(
    ("arg", "reply"),
    [
        ("TO:<>", replies.BAD_ADDRESS),
        ("FROM:<b@example.org>", replies.BAD_ARGUMENTS),
        ("TO:<b@example.org> NOTIFY=NEVER,SUCCESS", replies.BAD_ARGUMENTS),
        ("TO:<b@example.org> NOTIFY=SUCCESS,SUCCESS", replies.BAD_ARGUMENTS),
        ("TO:<b@example.org> NOTIFY=SOMETIMES", replies.BAD_ARGUMENTS),
        ("TO:<b@example.org> NOTIFY=", replies.BAD_ARGUMENTS),
        ("TO:<b@example.org> ORCPT=b@example.org", replies.BAD_ARGUMENTS),
        ("TO:<b@example.org> ORCPT=rfc822;", replies.BAD_ARGUMENTS),
        ("TO:<b@example.org> SIZE=10", replies.PARAM_NOT_RECOGNIZED),
        ("TO:<bö@example.org>", replies.UTF8_NOT_REQUESTED),
    ],
)
def test_rcpt_refusals(arg: str, reply: Reply) -> None:
    with pytest.raises(ProtocolViolation) as exc:
        parse.parse_rcpt_args(arg, smtputf8=False)
    assert reply_of(exc) == refusal(reply)


def test_rcpt_utf8_with_smtputf8_transaction() -> None:
    assert parse.parse_rcpt_args("TO:<bö@exämple.org>", smtputf8=True).address == ("bö@exämple.org")


@pytest.mark.parametrize(
    ("xtext", "text"),
    [("abc", "abc"), ("a+2Bb", "a+b"), ("a+3db", "a=b"), ("+20", " "), ("", "")],
)
def test_xtext(xtext: str, text: str) -> None:
    assert parse.decode_xtext(xtext) == text


@pytest.mark.parametrize("xtext", ["a=b", "a+", "a+2", "a+G0", "a b", "+00", "+7F", "é"])
def test_bad_xtext(xtext: str) -> None:
    with pytest.raises(ProtocolViolation):
        parse.decode_xtext(xtext)


# --- EHLO and SASL ------------------------------------------------------------------------------
@pytest.mark.parametrize("arg", ["client.test", "[192.0.2.1]", "DESKTOP_ABC", " client.test "])
def test_ehlo_names_are_taken_liberally(arg: str) -> None:
    assert parse.parse_ehlo_domain(arg) == arg.strip()


@pytest.mark.parametrize("arg", ["", " ", "two words", "héllo", "a\tb"])
def test_ehlo_refusals(arg: str) -> None:
    with pytest.raises(ProtocolViolation) as exc:
        parse.parse_ehlo_domain(arg)
    assert reply_of(exc) == refusal(replies.BAD_ARGUMENTS)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def test_sasl_plain() -> None:
    assert parse.parse_sasl_plain(b64(b"\0alice\0secret")) == ("alice", "secret")
    assert parse.parse_sasl_plain(b64(b"alice\0alice\0s e c")) == ("alice", "s e c")
    assert parse.parse_sasl_plain(b64("\0jörg\0pässwort".encode())) == ("jörg", "pässwort")


@pytest.mark.parametrize(
    ("response", "reply"),
    [
        (b64(b"bob\0alice\0secret"), replies.BAD_CREDENTIALS),
        (b64(b"alice\0secret"), replies.AUTH_BAD_ENCODING),
        (b64(b"\0alice\0secret\0"), replies.AUTH_BAD_ENCODING),
        (b64(b"\0\0secret"), replies.AUTH_BAD_ENCODING),
        (b64(b"\0alice\0"), replies.AUTH_BAD_ENCODING),
        (b64(b"\0al\xffice\0secret"), replies.AUTH_BAD_ENCODING),
        ("AGFsaWNlAHNlY3JldA", replies.AUTH_BAD_ENCODING),  # padding missing
        ("AGFsaWNl AHNlY3JldA==", replies.AUTH_BAD_ENCODING),
        ("!!!!", replies.AUTH_BAD_ENCODING),
        ("", replies.AUTH_BAD_ENCODING),
        ("é", replies.AUTH_BAD_ENCODING),
    ],
)
def test_sasl_plain_refusals(response: str, reply: Reply) -> None:
    with pytest.raises(ProtocolViolation) as exc:
        parse.parse_sasl_plain(response)
    assert reply_of(exc) == refusal(reply)


# --- properties ---------------------------------------------------------------------------------
ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
LDH = "abcdefghijklmnopqrstuvwxyz0123456789"
atoms = st.text(alphabet=ATEXT, min_size=1, max_size=10)
dot_strings = st.lists(atoms, min_size=1, max_size=4).map(".".join)
qtext = st.sampled_from([chr(c) for c in range(32, 127) if chr(c) not in '"\\<>'])
quoted_pairs = st.sampled_from([chr(c) for c in range(32, 127) if chr(c) not in "<>"]).map(
    lambda c: "\\" + c
)
quoted_strings = st.lists(qtext | quoted_pairs, max_size=8).map(lambda xs: '"' + "".join(xs) + '"')
labels = st.builds(
    lambda first, mid, last: first + mid + last if mid or last else first,
    st.sampled_from(LDH),
    st.text(alphabet=LDH + "-", max_size=8),
    st.sampled_from(LDH),
)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)
addresses = st.builds(lambda local, domain: f"{local}@{domain}", dot_strings | quoted_strings,
                      domains)  # fmt: skip


@given(addresses)
def test_grammar_addresses_are_accepted_unchanged(address: str) -> None:
    assert parse.is_valid_address(address)
    found, rest = parse.parse_path(
        f"<@relay.test:{address}> SIZE=1", allow_null=False, allow_postmaster=False,
        smtputf8=False,
    )  # fmt: skip
    assert (found, rest) == (address, " SIZE=1")


@given(st.text(max_size=80), st.booleans())
def test_accepted_addresses_never_contain_cr_lf_or_brackets(text: str, smtputf8: bool) -> None:
    for candidate in (text, f"<{text}>", f"<{text}@example.org>", f'<"{text}"@example.org>'):
        try:
            found, _ = parse.parse_path(
                candidate, allow_null=True, allow_postmaster=True, smtputf8=smtputf8
            )
        except ProtocolViolation as e:
            assert e.reply.code in (501, 553)
            continue
        assert not set(found) & set("\r\n<>\0")
        assert smtputf8 or found.isascii()


@given(st.text(max_size=120))
def test_mail_and_rcpt_arguments_never_raise_anything_else(text: str) -> None:
    for call in (
        lambda: parse.parse_mail_args("FROM:" + text),
        lambda: parse.parse_rcpt_args("TO:" + text, smtputf8=True),
        lambda: parse.parse_sasl_plain(text),
        lambda: parse.parse_ehlo_domain(text),
    ):
        try:
            call()
        except ProtocolViolation as e:
            assert 500 <= e.reply.code < 600


# --- bearer tokens (RFC 7628 OAUTHBEARER, XOAUTH2) ---------------------------------------------
def test_oauthbearer_and_xoauth2() -> None:
    bearer = (
        b"n,a=alice@example.org,\x01host=mail.test\x01port=587\x01auth=Bearer eyJ.a-b_c.d\x01\x01"
    )
    assert parse.parse_oauthbearer(b64(bearer)) == ("alice@example.org", "eyJ.a-b_c.d")
    assert parse.parse_oauthbearer(b64(b"n,,\x01auth=bearer tok\x01\x01")) == ("", "tok")
    assert parse.parse_oauthbearer(b64(b"y,a=a=2Cb=3Dc,\x01auth=Bearer t\x01\x01")) == (
        "a,b=c",
        "t",
    )
    xoauth2 = b"user=alice@example.org\x01auth=Bearer eyJ.x.y\x01\x01"
    assert parse.parse_xoauth2(b64(xoauth2)) == ("alice@example.org", "eyJ.x.y")


@pytest.mark.parametrize(
    "raw",
    [
        b"n,,\x01auth=Bearer tok\x01",  # no final empty pair
        b"p=tls-unique,,\x01auth=Bearer tok\x01\x01",  # channel binding: not supported
        b"n,user,\x01auth=Bearer tok\x01\x01",  # authzid without a=
        b"n,\x01auth=Bearer tok\x01\x01",  # gs2 header too short
        b"n,,\x01auth=Basic dG9r\x01\x01",  # not a bearer token
        b"n,,\x01auth=Bearer \x01\x01",  # empty token
        b"n,,\x01host=x\x01\x01",  # no auth=
        b"n,,\x01auth=Bearer t\x01auth=Bearer u\x01\x01",  # twice
        b"n,,\x01auth=Bearer t\xff\x01\x01",  # not UTF-8
        b"n,,\x00\x01auth=Bearer t\x01\x01",
    ],
)
def test_oauthbearer_refusals(raw: bytes) -> None:
    with pytest.raises(ProtocolViolation) as exc:
        parse.parse_oauthbearer(b64(raw))
    assert reply_of(exc) == refusal(replies.AUTH_BAD_ENCODING)


@pytest.mark.parametrize("raw", [b"auth=Bearer t\x01\x01", b"user=\x01auth=Bearer t\x01\x01",
                                 b"user=a\x01auth=Bearer t"])  # fmt: skip
def test_xoauth2_refusals(raw: bytes) -> None:
    with pytest.raises(ProtocolViolation) as exc:
        parse.parse_xoauth2(b64(raw))
    assert reply_of(exc) == refusal(replies.AUTH_BAD_ENCODING)

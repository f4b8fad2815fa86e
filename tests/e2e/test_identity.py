"""The sender-identity promise under attack (issue #11, classes 1-5), against `mailgate serve`.

The seed's promise: "authenticated senders are clearly identified in the messages' headers",
and nobody may use an address of the institution's own or managed domains that is not theirs.
Each test below is one variant an attacker tried, with the exact answer it now gets; each
accepted message is read back from the spool (the bytes that will be delivered) and, when
signed, verified with dkimpy against the key `mailgate domain dns` publishes.

Site: default domain example.org (alice, bob), managed college.example.org (DKIM key; alice
is granted bursar@college.example.org) and the IDN xn--bcher-kva.example (bücher.example).
"""

from __future__ import annotations

import email
import email.policy
import re
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

import dkim
from tests.e2e.conftest import ALICE, submission
from tests.support.gateway import Gateway

pytestmark = pytest.mark.e2e

COLLEGE = "college.example.org"
IDN = "xn--bcher-kva.example"  # bücher.example
BURSAR = f"bursar@{COLLEGE}"  # granted to alice
PAD_FIELD = "X-Pad: " + "p" * 900 + "\r\n"  # one padding field, 909 bytes


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = Gateway(tmp_path_factory.mktemp("identity") / "gw")
    gateway.add_user(*ALICE)
    gateway.add_user("bob", "bob's password")
    gateway.cli("domain", "add", COLLEGE)
    gateway.cli("domain", "add", IDN)
    gateway.cli("address", "add", BURSAR, "--owner", "alice")
    gateway.start("--no-delivery")
    try:
        yield gateway
    finally:
        gateway.finish()


def send(gw: Gateway, message: str | bytes, mail_from: str = "alice@example.org",
         login: tuple[str, str] = ALICE) -> tuple[str, bytes | None]:  # fmt: skip
    """Submit `message` on 587; (the final reply as "code text", the spooled bytes or None)."""
    data = message.encode() if isinstance(message, str) else message
    with submission(gw, login) as client:
        code, text = client.mail(mail_from)
        if code != 250:
            return f"{code} {text.decode()}", None
        assert client.rcpt("someone@remote.test")[0] == 250
        code, text = client.data(data)
    reply = f"{code} {text.decode()}"
    if code != 250:
        return reply, None
    qid = text.decode().rsplit(" ", 1)[1]
    return reply, gw.message(qid)


def msg(*fields: str, body: str = "Hello.\r\n") -> str:
    return (
        "".join(f + "\r\n" for f in fields) + "To: someone@remote.test\r\nSubject: t\r\n\r\n" + body
    )


def dkim_verifies(gw: Gateway, message: bytes) -> bool:
    """dkimpy's verdict on the first signature, with the key `domain dns` prints."""
    printed = gw.cli("domain", "dns", COLLEGE).stdout
    line = next(x for x in printed.splitlines() if "._domainkey." in x)
    record = "".join(re.findall(r'"([^"]*)"', line)).encode()
    return bool(dkim.verify(message, dnsfunc=lambda name, timeout=5: record))


def field_values(message: bytes, name: str) -> list[str]:
    """The values of field `name` as Python's email package reads them (not our parser)."""
    parsed = email.message_from_bytes(message, policy=email.policy.compat32)
    return [str(v).strip() for v in parsed.get_all(name, [])]


# --- class 1: the policy and the signer see the same header section ---------------------------

PADDING = PAD_FIELD * 300  # 272,700 bytes: past the 262,144-byte header limit
TOO_BIG = "552 5.3.4 Message header section too big (limit 262144 bytes)"


@pytest.mark.parametrize(
    "late_field",
    [f"From: dean@{COLLEGE}", f"Sender: dean@{COLLEGE}",
     "Received: from x by y; Thu, 3 Dec 2026 08:00:00 +0000"],
    ids=["from", "sender", "received"],
)  # fmt: skip
def test_a_field_after_padding_is_never_signed_unexamined(gw: Gateway, late_field: str) -> None:
    # Before: the summary stopped at 256 KiB, the signer read everything: 250 and a passing
    # DKIM signature over a forged From:/Sender: (or 60 Received: fields beyond the hop count).
    late = "\r\n".join([late_field] * (60 if late_field.startswith("Received") else 1))
    reply, stored = send(gw, msg(f"From: {BURSAR}", PADDING.rstrip("\r\n"), late))
    assert (reply, stored) == (TOO_BIG, None)


def test_a_large_header_section_under_the_limit_is_read_whole_and_signed(gw: Gateway) -> None:
    reply, stored = send(gw, msg(f"From: {BURSAR}", (PAD_FIELD * 200).rstrip("\r\n")))
    assert reply.startswith("250 2.0.0 Ok: queued as ") and stored is not None
    assert dkim_verifies(gw, stored)


def test_a_field_after_padding_under_the_limit_is_examined(gw: Gateway) -> None:
    reply, _ = send(gw, msg(f"From: {BURSAR}", (PAD_FIELD * 200).rstrip("\r\n"),
                            f"Sender: dean@{COLLEGE}"))  # fmt: skip
    assert reply == "553 5.7.1 Sender address not allowed for this login"


# --- class 2: author fields the strict reader cannot read are refused, not "foreign" ----------

NOT_ALLOWED = "553 5.7.1 Sender address not allowed for this login"
UNREADABLE = "554 5.6.0 From field cannot be read strictly: "
LOOKALIKE = (
    "a domain written with characters that receivers may read differently"
    " (write college.example.org)"
)


@pytest.mark.parametrize(
    ("from_field", "expected"),
    [
        # RFC 5322 §4.5.2 obs-from: white space before the colon
        (f"From : dean@{COLLEGE}",
         "554 5.6.0 Malformed message header: white space between the field name 'From' and"
         " its colon"),
        (f"From\t: dean@{COLLEGE}",
         "554 5.6.0 Malformed message header: white space between the field name 'From' and"
         " its colon"),
        # an RFC 2047 encoded word standing for the whole address
        (f"From: =?utf-8?q?dean=40{COLLEGE}?=",
         UNREADABLE + "an encoded word (RFC 2047) instead of an address"),
        (f"From: =?utf-8?b?ZGVhbkBjb2xsZWdlLmV4YW1wbGUub3Jn?= <dean@{COLLEGE}>", NOT_ALLOWED),
        # an encoded word in the display name that a mail program shows as the address
        (f"From: =?utf-8?q?dean=40{COLLEGE}?= <mallory@gmail.test>", NOT_ALLOWED),
        (f'From: "dean@{COLLEGE}" <mallory@gmail.test>', NOT_ALLOWED),
        (f"From: mallory@gmail.test (dean＠{COLLEGE})", NOT_ALLOWED),
        # Unicode full stops and fullwidth letters: UTS-46 maps them to the managed domain, a
        # receiver that does not shows another one; only canonical spellings are read
        ("From: dean@college\u3002example\u3002org", UNREADABLE + LOOKALIKE),
        ("From: dean@college\uff0eexample\uff61org", UNREADABLE + LOOKALIKE),
        ("From: dean@ｃｏｌｌｅｇｅ.example.org", UNREADABLE + LOOKALIKE),
        ("From: dean@college.example.org\u200b", UNREADABLE + "unexpected '\\u200b' after the"
         " address"),
        ("From: dean@COLLEGE.Example.ORG", NOT_ALLOWED),
        # a quoted domain, a domain literal, trailing dots
        (f'From: dean@"{COLLEGE}"', UNREADABLE + "a quoted domain"),
        ("From: dean@[192.0.2.1]", UNREADABLE + "a domain literal instead of a domain name"),
        (f"From: dean@{COLLEGE}.",
         UNREADABLE + "an empty part in the domain (a leading, trailing or doubled dot)"),
        (f"From: dean@{COLLEGE}..",
         UNREADABLE + "an empty part in the domain (a leading, trailing or doubled dot)"),
        ("From: dean@college.example.org\u3002",
         UNREADABLE + "domain with an empty label (a trailing or doubled dot)"),
        # the U-label spelling of a domain added in A-label form
        ("From: dean@bücher.example", NOT_ALLOWED),
        ("From: dean@BÜCHER.example", NOT_ALLOWED),
        # a group, a quoted local part, nothing at all
        (f"From: staff: dean@{COLLEGE};", UNREADABLE + "a group (name: addresses;) instead of"
         " a mailbox"),
        (f'From: "dean"@{COLLEGE}', UNREADABLE + "a quoted local part"),
        ("From:", UNREADABLE + "no address"),
    ],
)  # fmt: skip
def test_author_field_variants(gw: Gateway, from_field: str, expected: str) -> None:
    reply, stored = send(gw, msg(from_field).encode())
    assert (reply, stored) == (expected, None)


@pytest.mark.parametrize(
    "fields",
    [
        [f"From: {BURSAR}", "From: boss@gmail.test"],
        ["From: boss@gmail.test", f"From: {BURSAR}"],
        [f"From: {BURSAR}", "Sender: alice@example.org", "Sender: boss@gmail.test"],
    ],
    ids=["from-own-then-foreign", "from-foreign-then-own", "two-senders"],
)
def test_duplicate_author_fields_are_refused(gw: Gateway, fields: list[str]) -> None:
    reply, stored = send(gw, msg(*fields))
    name = fields[-1].split(":")[0]
    assert (reply, stored) == (f"554 5.6.0 {name} field cannot be read strictly: more than one"
                               f" {name}: field", None)  # fmt: skip


def test_an_address_in_the_display_name_that_is_the_users_own_is_fine(gw: Gateway) -> None:
    # What Outlook writes when no name is set; it must keep working, signed.
    reply, stored = send(gw, msg(f'From: "{BURSAR}" <{BURSAR}>'))
    assert reply.startswith("250 ") and stored is not None
    assert field_values(stored, "sender") == [] and dkim_verifies(gw, stored)


# --- class 3: subdomains of the default and managed domains are the institution's -------------


@pytest.mark.parametrize(
    "address", ["ceo@hr.example.org", f"dean@a.b.{COLLEGE}", "x@sub.xn--bcher-kva.example",
                "x@sub.bücher.example"],
)  # fmt: skip
def test_from_a_subdomain_is_refused(gw: Gateway, address: str) -> None:
    reply, stored = send(gw, msg(f"From: {address}").encode())
    assert (reply, stored) == (NOT_ALLOWED, None)


@pytest.mark.parametrize("address", ["x@sub.example.org", f"x@hr.{COLLEGE}",
                                     "x@sub.EXAMPLE.org"])  # fmt: skip
def test_mail_from_a_subdomain_is_refused(gw: Gateway, address: str) -> None:
    reply, stored = send(gw, msg(f"From: {BURSAR}"), mail_from=address)
    assert (reply, stored) == (NOT_ALLOWED, None)


def test_foreign_subdomains_are_an_operators_exception(tmp_path: Path) -> None:
    gw = Gateway(tmp_path / "gw", {"policy": {"foreign_subdomains": ["lists.example.org"]}})
    gw.add_user(*ALICE)
    gw.start("--no-delivery")
    try:
        reply, stored = send(gw, msg("From: news@lists.example.org"))
        assert reply.startswith("250 ") and stored is not None
        assert field_values(stored, "sender") == ["<alice@example.org>"]
        reply, stored = send(gw, msg("From: news@a.lists.example.org"))
        assert reply.startswith("250 ") and stored is not None
        assert send(gw, msg("From: ceo@hr.example.org")) == (NOT_ALLOWED, None)
    finally:
        gw.finish()


# --- class 4: client-supplied Sender:, Resent-From:, Resent-Sender: ---------------------------


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        (f"Sender: dean@{COLLEGE}", "553 5.7.1 Sender address not allowed for this login"),
        ("Sender: Bob <bob@example.org>", "553 5.7.1 Sender address not allowed for this login"),
        (f"Resent-From: dean@{COLLEGE}",
         "553 5.7.1 Resent-From address not allowed for this login"),
        ("Resent-Sender: bob@example.org",
         "553 5.7.1 Resent-Sender address not allowed for this login"),
        ("Resent-Sender: x@hr.example.org",
         "553 5.7.1 Resent-Sender address not allowed for this login"),
        ("Sender: =?utf-8?q?bob=40example.org?= <alice@example.org>",
         "553 5.7.1 Sender address not allowed for this login"),
        ("Resent-From : bob@example.org",
         "554 5.6.0 Malformed message header: white space between the field name"
         " 'Resent-From' and its colon"),
    ],
)  # fmt: skip
def test_client_identity_fields_naming_others_are_refused(
    gw: Gateway, field: str, expected: str
) -> None:
    reply, stored = send(gw, msg(f"From: {BURSAR}", field))
    assert (reply, stored) == (expected, None)


def test_own_sender_field_is_kept_and_signed(gw: Gateway) -> None:
    reply, stored = send(gw, msg(f"From: {BURSAR}", "Sender: alice@example.org"))
    assert reply.startswith("250 ") and stored is not None
    assert field_values(stored, "sender") == ["alice@example.org"]
    assert dkim_verifies(gw, stored)


def test_foreign_sender_field_is_replaced_by_our_stamp(gw: Gateway) -> None:
    reply, stored = send(gw, msg(f"From: {BURSAR}", "Sender: boss@gmail.test"))
    assert reply.startswith("250 ") and stored is not None
    assert field_values(stored, "sender") == ["<alice@example.org>"]
    assert b"DKIM-Signature" not in stored


# --- class 5: white space before the colon changes nothing, and never gets a 451 --------------

EXE = "TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAgAAAAA=="
OBS = "554 5.6.0 Malformed message header: white space between the field name '{}' and its colon"
BAD_MIME = "554 5.6.0 Message structure too deep or too broken to inspect"


def mixed(content_type_field: str, part_type_field: str, author: str) -> str:
    return (
        f"From: {author}\r\nTo: someone@remote.test\r\nSubject: report\r\nMIME-Version: 1.0\r\n"
        f"{content_type_field} multipart/mixed; boundary=BB\r\n\r\n"
        "--BB\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
        f"--BB\r\n{part_type_field} application/octet-stream; name=setup.exe\r\n"
        "Content-Disposition: attachment; filename=setup.exe\r\n"
        f"Content-Transfer-Encoding: base64\r\n\r\n{EXE}\r\n--BB--\r\n"
    )


@pytest.mark.parametrize("author", [BURSAR, "alice@gmail.test"], ids=["signed", "foreign"])
@pytest.mark.parametrize(
    ("top", "part", "expected"),
    [
        ("Content-Type :", "Content-Type:", OBS.format("Content-Type")),
        ("Content-Type\t:", "Content-Type:", OBS.format("Content-Type")),
        ("Content-Type:", "Content-Type :", BAD_MIME),
        ("Content-Type:", "Content-Disposition: inline\r\nContent-Type :", BAD_MIME),
    ],
    ids=["top", "top-tab", "part", "part-second-field"],
)
def test_content_type_with_space_before_the_colon(
    gw: Gateway, top: str, part: str, expected: str, author: str
) -> None:
    # Before: the MIME walk saw text/plain and let setup.exe through (250), or, with a signed
    # From:, dkimpy's parser raised and the client got 451 4.3.0 and retried forever.
    reply, stored = send(gw, mixed(top, part, author))
    assert (reply, stored) == (expected, None)


def test_the_same_message_without_the_space_is_the_blocked_type(gw: Gateway) -> None:
    reply, _ = send(gw, mixed("Content-Type:", "Content-Type:", BURSAR))
    assert reply.startswith("554 5.7.1 Message rejected: attachment 'setup.exe'")


@pytest.mark.parametrize("field", ["Subject : hello", "X-Mailer\t: x", "From x@y.test Thu"])
def test_no_451_for_a_header_that_can_never_succeed(gw: Gateway, field: str) -> None:
    reply, stored = send(gw, f"From: {BURSAR}\r\n{field}\r\n\r\nHello.\r\n")
    assert reply.startswith("554 5.6.0 Malformed message header: ") and stored is None


def test_a_header_without_its_empty_line_is_repaired_and_signed(gw: Gateway) -> None:
    # A script's "Subject: x" followed straight by text: the body starts at the first line that
    # cannot be a field; the empty line is inserted so that every reader agrees (was 451).
    reply, stored = send(gw, f"From: {BURSAR}\r\nSubject: x\r\nHello there.\r\n")
    assert reply.startswith("250 ") and stored is not None
    assert stored.endswith(b"Subject: x\r\n\r\nHello there.\r\n")
    assert dkim_verifies(gw, stored)


def test_smtplib_send_message_still_works(gw: Gateway) -> None:
    with submission(gw) as client:
        refused = client.sendmail(BURSAR, ["someone@remote.test"], msg(f"From: {BURSAR}"))
    assert refused == {}


def test_a_smarthost_message_with_unreadable_author_fields_is_relayed_unsigned(
    gw: Gateway,
) -> None:
    with smtplib.SMTP("127.0.0.1", gw.ports["smarthost"], timeout=10) as client:
        client.ehlo("printer.test")
        code, text = client.mail("printer@example.org")
        assert code == 250
        assert client.rcpt("someone@remote.test")[0] == 250
        code, text = client.data(b"From: root (Cron Daemon)\r\nSubject: cron\r\n\r\nok\r\n")
    assert code == 250, text
    stored = gw.message(text.decode().rsplit(" ", 1)[1])
    assert b"DKIM-Signature" not in stored and b"Sender:" not in stored

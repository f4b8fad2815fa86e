"""mailgate.smtp.server.ServerConnection without sockets: bytes in, events and exact replies out.

The fake adapter of the dialogue runner answers events (alice/secret is the one account), so
these tests see what a client would see. Property tests: arbitrary bytes, answered with
arbitrary replies, never raise and only ever produce well-formed replies; the chunking of the
input never changes the session; nothing written after STARTTLS is ever executed.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate import replies
from mailgate.errors import UsageError
from mailgate.replies import Reply
from mailgate.smtp.events import (
    PROFILES,
    SMARTHOST,
    SUBMISSION,
    SUBMISSIONS,
    Auth,
    Close,
    DataStart,
    Ehlo,
    EndOfData,
    Event,
    MailFrom,
    MessageChunk,
    Profile,
    Quit,
    RcptTo,
    Reset,
    StartTls,
)
from mailgate.smtp.server import NEED_DATA, TRANSITIONS, ServerConnection, State
from tests.dialogues.runner import drive, fake_answer

HOST = "mx.test"
# A refusal a session really sends at DATA (limits/rate.py): 450 4.7.1
RATE_LIMITED = replies.rate_limited("Too many messages per hour from this login (limit 100)")
PLAIN_ALICE = base64.b64encode(b"\0alice\0secret").decode()


def machine(profile: Profile = SMARTHOST, **limits: int) -> ServerConnection:
    options: dict[str, Any] = {"max_message_size": 1000, **limits}
    conn = ServerConnection(profile, HOST, **options)
    conn.start()
    conn.data_to_send()
    return conn


def feed(conn: ServerConnection, data: bytes) -> tuple[list[Event], list[str]]:
    """Send `data`, answer events with the fake adapter; the events and reply lines."""
    events = drive(conn, data)
    return events, lines(conn)


def lines(conn: ServerConnection) -> list[str]:
    out = conn.data_to_send().decode("utf-8")
    assert out == "" or out.endswith("\r\n")
    return out.split("\r\n")[:-1]


def greeted(profile: Profile = SMARTHOST, **limits: int) -> ServerConnection:
    conn = machine(profile, **limits)
    feed(conn, b"EHLO client.test\r\n")
    return conn


def authenticated(**limits: int) -> ServerConnection:
    conn = greeted(SUBMISSIONS, **limits)
    _, out = feed(conn, f"AUTH PLAIN {PLAIN_ALICE}\r\n".encode())
    assert out == ["235 2.7.0 Authentication successful"]
    return conn


def in_data(**limits: int) -> ServerConnection:
    conn = greeted(SMARTHOST, **limits)
    feed(conn, b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
    assert state(conn) is State.DATA
    return conn


def state(conn: ServerConnection) -> State:
    """The state, read through a call so that mypy does not keep an earlier narrowing."""
    return conn.state


def line(reply: Reply) -> str:
    return reply.line()


# --- greeting and EHLO --------------------------------------------------------------------------
def test_greeting() -> None:
    conn = ServerConnection(SUBMISSION, HOST, max_message_size=1000)
    assert state(conn) is State.NEW
    conn.start()
    assert conn.data_to_send() == b"220 mx.test ESMTP mailgate\r\n"
    assert state(conn) is State.CONNECTED and not conn.is_tls


BASE_CAPS = ["250-mx.test", "250-PIPELINING", "250-SIZE 1000", "250-8BITMIME", "250-SMTPUTF8",
             "250-ENHANCEDSTATUSCODES"]  # fmt: skip


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        (SUBMISSION, [*BASE_CAPS, "250-DSN", "250 STARTTLS"]),
        (SMARTHOST, [*BASE_CAPS, "250-DSN", "250 STARTTLS"]),
        (SUBMISSIONS, [*BASE_CAPS, "250-DSN", "250-REQUIRETLS", "250 AUTH PLAIN LOGIN"]),
    ],
)
def test_ehlo_capabilities(profile: Profile, expected: list[str]) -> None:
    conn = machine(profile)
    events, out = feed(conn, b"EHLO client.test\r\n")
    assert events == [Ehlo(domain="client.test", extended=True)]
    assert out == expected
    assert conn.ehlo_domain == "client.test" and state(conn) is State.GREETED


@pytest.mark.parametrize(
    ("profile", "last"),
    [(SUBMISSION, "250 AUTH PLAIN LOGIN"), (SMARTHOST, "250 DSN")],
)
def test_ehlo_capabilities_after_starttls(profile: Profile, last: str) -> None:
    conn = greeted(profile)
    events, out = feed(conn, b"STARTTLS\r\n")
    assert events == [StartTls()] and out == ["220 2.0.0 Ready to start TLS"]
    _, out = feed(conn, b"EHLO client.test\r\n")
    assert out[-1] == last
    assert "250-STARTTLS" not in out


def test_helo_is_plain() -> None:
    conn = machine(SUBMISSION)
    events, out = feed(conn, b"HELO client.test\r\n")
    assert events == [Ehlo(domain="client.test", extended=False)]
    assert out == ["250 mx.test"]


@pytest.mark.parametrize(
    "data", [b"EHLO\r\n", b"EHLO \r\n", b"HELO a b\r\n", b"EHLO h\xc3\xa9\r\n"]
)
def test_ehlo_syntax(data: bytes) -> None:
    conn = machine()
    events, out = feed(conn, data)
    assert events == [] and out == [line(replies.BAD_ARGUMENTS)]
    assert state(conn) is State.CONNECTED


def test_ehlo_refused_by_adapter_leaves_state() -> None:
    conn = machine()
    conn.receive_data(b"EHLO client.test\r\n")
    assert conn.next_event() == Ehlo(domain="client.test", extended=True)
    conn.send(Reply(550, "5.7.1", "Go away"))
    assert lines(conn) == ["550 5.7.1 Go away"]
    assert state(conn) is State.CONNECTED and conn.ehlo_domain is None and conn.error_count == 1


def test_ehlo_in_transaction_resets_it() -> None:
    conn = greeted()
    feed(conn, b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n")
    assert state(conn) is State.RCPT
    events, out = feed(conn, b"EHLO again.test\r\n")
    assert events == [Reset(), Ehlo(domain="again.test", extended=True)]
    assert out[0] == "250-mx.test" and len(out) == 8  # no separate 250 for the reset
    _, out = feed(conn, b"RCPT TO:<b@y.test>\r\n")
    assert out == [line(replies.BAD_SEQUENCE)]


# --- STARTTLS -----------------------------------------------------------------------------------
def test_starttls_forgets_the_session() -> None:
    conn = greeted(SUBMISSION)
    events, out = feed(conn, b"STARTTLS\r\n")
    assert events == [StartTls()] and conn.is_tls
    assert state(conn) is State.CONNECTED and conn.ehlo_domain is None and conn.login is None
    _, out = feed(conn, b"MAIL FROM:<a@x.test>\r\n")
    assert out == [line(replies.BAD_SEQUENCE)]  # RFC 3207 §4.2: EHLO again first


def test_starttls_waits_for_tls_started() -> None:
    conn = greeted(SUBMISSION)
    conn.receive_data(b"STARTTLS\r\n")
    assert conn.next_event() == StartTls()
    assert state(conn) is State.TLS_PENDING and conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b"220 2.0.0 Ready to start TLS\r\n"
    conn.tls_started()
    assert state(conn) is State.CONNECTED and conn.is_tls
    with pytest.raises(UsageError):
        conn.tls_started()


@pytest.mark.parametrize("after", [b"RSET\r\n", b"R", b"\r\n", b"MAIL FROM:<a@x.test>\r\n"])
def test_pipelined_starttls_closes(after: bytes) -> None:
    conn = greeted(SUBMISSION)
    events, out = feed(conn, b"STARTTLS\r\n" + after)
    assert events == [Close(reason="commands pipelined after STARTTLS")]
    assert out == [line(replies.PIPELINED_STARTTLS)]
    assert conn.is_closed and not conn.is_tls
    assert feed(conn, b"NOOP\r\n") == ([], [])


def test_pipelined_starttls_in_a_later_read_closes() -> None:
    conn = greeted(SUBMISSION)
    conn.receive_data(b"STARTTLS\r\n")
    conn.receive_data(b"RSET\r\n")
    assert conn.next_event() == Close(reason="commands pipelined after STARTTLS")
    assert lines(conn) == [line(replies.PIPELINED_STARTTLS)]


def test_plaintext_while_tls_pending_closes() -> None:
    conn = greeted(SUBMISSION)
    conn.receive_data(b"STARTTLS\r\n")
    assert conn.next_event() == StartTls()
    conn.receive_data(b"RSET\r\n")
    event = conn.next_event()
    assert isinstance(event, Close) and event.reply_sent
    assert lines(conn) == ["220 2.0.0 Ready to start TLS", line(replies.PIPELINED_STARTTLS)]


@pytest.mark.parametrize(
    ("profile", "data", "reply"),
    [
        (SUBMISSIONS, b"STARTTLS\r\n", replies.TLS_ALREADY_ACTIVE),
        (SMARTHOST, b"STARTTLS now\r\n", replies.BAD_ARGUMENTS),
        (SMARTHOST, b"MAIL FROM:<a@x.test>\r\nSTARTTLS\r\n", replies.BAD_SEQUENCE),
        (Profile("plain", False, False, False, False), b"STARTTLS\r\n", replies.NOT_IMPLEMENTED),
    ],
)
def test_starttls_refusals(profile: Profile, data: bytes, reply: Reply) -> None:
    conn = greeted(profile)
    events, out = feed(conn, data)
    assert out[-1] == line(reply)
    assert StartTls() not in events and not conn.is_closed


def test_starttls_again_after_tls_is_refused() -> None:
    conn = greeted(SUBMISSION)
    feed(conn, b"STARTTLS\r\n")
    _, out = feed(conn, b"EHLO c.test\r\nSTARTTLS\r\n")
    assert out[-1] == "503 5.5.1 TLS already active"


# --- AUTH ---------------------------------------------------------------------------------------
def test_auth_before_tls_on_submission() -> None:
    conn = greeted(SUBMISSION)
    events, out = feed(conn, f"AUTH PLAIN {PLAIN_ALICE}\r\nAUTH LOGIN\r\n".encode())
    assert events == []
    assert out == ["530 5.7.0 Must issue a STARTTLS command first"] * 2


def test_auth_not_offered_on_smarthost() -> None:
    conn = greeted(SMARTHOST)
    feed(conn, b"STARTTLS\r\n")
    feed(conn, b"EHLO c.test\r\n")
    _, out = feed(conn, f"AUTH PLAIN {PLAIN_ALICE}\r\n".encode())
    assert out == ["503 5.5.1 AUTH not available on this service"]


def test_auth_plain_initial_response() -> None:
    conn = greeted(SUBMISSIONS)
    events, out = feed(conn, f"AUTH PLAIN {PLAIN_ALICE}\r\n".encode())
    assert events == [Auth(mechanism="PLAIN", login="alice", password="secret")]
    assert out == ["235 2.7.0 Authentication successful"]
    assert (conn.login, conn.auth_mechanism) == ("alice", "PLAIN")
    assert "secret" not in repr(events[0])


def test_auth_plain_continuation() -> None:
    conn = greeted(SUBMISSIONS)
    events, out = feed(conn, b"AUTH plain\r\n")
    assert events == [] and out == ["334 "] and state(conn) is State.SASL
    events, out = feed(conn, PLAIN_ALICE.encode() + b"\r\n")
    assert events == [Auth(mechanism="PLAIN", login="alice", password="secret")]
    assert out == ["235 2.7.0 Authentication successful"] and state(conn) is State.GREETED


def test_auth_login() -> None:
    conn = greeted(SUBMISSIONS)
    _, out = feed(conn, b"AUTH LOGIN\r\n")
    assert out == ["334 VXNlcm5hbWU6"]
    _, out = feed(conn, b"YWxpY2U=\r\n")
    assert out == ["334 UGFzc3dvcmQ6"]
    events, out = feed(conn, b"c2VjcmV0\r\n")
    assert events == [Auth(mechanism="LOGIN", login="alice", password="secret")]
    assert out == ["235 2.7.0 Authentication successful"] and conn.auth_mechanism == "LOGIN"


def test_auth_login_initial_response_and_bad_password() -> None:
    conn = greeted(SUBMISSIONS)
    events, out = feed(conn, b"AUTH LOGIN YWxpY2U=\r\nd3Jvbmc=\r\n")
    assert events == [Auth(mechanism="LOGIN", login="alice", password="wrong")]
    assert out == ["334 UGFzc3dvcmQ6", "535 5.7.8 Authentication credentials invalid"]
    assert conn.login is None and conn.error_count == 1 and state(conn) is State.GREETED


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (b"AUTH PLAIN\r\n*\r\n", replies.AUTH_CANCELLED),
        (b"AUTH LOGIN\r\n*\r\n", replies.AUTH_CANCELLED),
        (b"AUTH LOGIN\r\nYWxpY2U=\r\n*\r\n", replies.AUTH_CANCELLED),
        (b"AUTH PLAIN *\r\n", replies.AUTH_CANCELLED),
        (b"AUTH PLAIN not-base64!\r\n", replies.AUTH_BAD_ENCODING),
        (b"AUTH PLAIN\r\nnot-base64!\r\n", replies.AUTH_BAD_ENCODING),
        (b"AUTH LOGIN\r\n====\r\n", replies.AUTH_BAD_ENCODING),
        (b"AUTH PLAIN =\r\n", replies.AUTH_BAD_ENCODING),
        (b"AUTH PLAIN YWxpY2UAc2VjcmV0\r\n", replies.AUTH_BAD_ENCODING),  # one NUL only
        (b"AUTH PLAIN Ym9iAGFsaWNlAHNlY3JldA==\r\n", replies.BAD_CREDENTIALS),  # authzid bob
        (b"AUTH CRAM-MD5\r\n", replies.AUTH_NOT_SUPPORTED),
        (b"AUTH\r\n", replies.BAD_ARGUMENTS),
        (b"AUTH PLAIN a b\r\n", replies.BAD_ARGUMENTS),
    ],
)
def test_auth_refusals(data: bytes, reply: Reply) -> None:
    conn = greeted(SUBMISSIONS)
    events, out = feed(conn, data)
    assert events == [] and out[-1] == line(reply)
    assert state(conn) is State.GREETED and conn.login is None
    _, out = feed(conn, f"AUTH PLAIN {PLAIN_ALICE}\r\n".encode())  # and AUTH works again
    assert out == ["235 2.7.0 Authentication successful"]


def test_auth_authzid_equal_to_authcid_is_fine() -> None:
    conn = greeted(SUBMISSIONS)
    response = base64.b64encode(b"alice\0alice\0secret").decode()
    events, _ = feed(conn, f"AUTH PLAIN {response}\r\n".encode())
    assert events == [Auth(mechanism="PLAIN", login="alice", password="secret")]


def test_auth_twice() -> None:
    conn = authenticated()
    _, out = feed(conn, f"AUTH PLAIN {PLAIN_ALICE}\r\n".encode())
    assert out == ["503 5.5.1 Already authenticated"]


def test_auth_before_ehlo_and_in_transaction() -> None:
    conn = machine(SUBMISSIONS)
    _, out = feed(conn, f"AUTH PLAIN {PLAIN_ALICE}\r\n".encode())
    assert out == [line(replies.BAD_SEQUENCE)]
    optional_auth = Profile("optional", offers_starttls=False, implicit_tls=True,
                            offers_auth=True, requires_auth=False)  # fmt: skip
    conn = greeted(optional_auth)
    _, out = feed(conn, f"MAIL FROM:<a@x.test>\r\nAUTH PLAIN {PLAIN_ALICE}\r\n".encode())
    assert out == [line(replies.SENDER_OK), line(replies.BAD_SEQUENCE)]  # RFC 4954 §4


def test_auth_line_limit_is_12288() -> None:
    conn = greeted(SUBMISSIONS)
    long_response = base64.b64encode(b"\0alice\0" + b"p" * 9000).decode()
    assert 512 < len(long_response) + 13 <= 12288
    events, out = feed(conn, f"AUTH PLAIN {long_response}\r\n".encode())
    assert events == [Auth(mechanism="PLAIN", login="alice", password="p" * 9000)]
    assert out == ["535 5.7.8 Authentication credentials invalid"]
    _, out = feed(conn, b"AUTH PLAIN " + b"A" * 12300 + b"\r\nNOOP\r\n")
    assert out == [line(replies.AUTH_LINE_TOO_LONG), line(replies.NOOP_OK)]


def test_sasl_response_over_limit() -> None:
    conn = greeted(SUBMISSIONS)
    feed(conn, b"AUTH PLAIN\r\n")
    _, out = feed(conn, b"A" * 13000)
    assert out == ["500 5.5.6 Authentication exchange line too long"]
    assert state(conn) is State.GREETED
    _, out = feed(conn, b"AAAA\r\nNOOP\r\n")  # the rest of that line is dropped
    assert out == [line(replies.NOOP_OK)]


# --- MAIL ---------------------------------------------------------------------------------------
def test_mail_on_submission_before_tls_and_before_auth() -> None:
    conn = greeted(SUBMISSION)
    _, out = feed(conn, b"MAIL FROM:<alice@x.test>\r\n")
    assert out == ["530 5.7.0 Must issue a STARTTLS command first"]
    feed(conn, b"STARTTLS\r\n")
    feed(conn, b"EHLO c.test\r\n")
    _, out = feed(conn, b"MAIL FROM:<alice@x.test>\r\n")
    assert out == ["530 5.7.0 Authentication required"]


def test_mail_after_auth() -> None:
    conn = authenticated()
    events, out = feed(conn, b"MAIL FROM:<alice@x.test>\r\n")
    assert events == [MailFrom(address="alice@x.test")] and out == [line(replies.SENDER_OK)]
    assert state(conn) is State.MAIL


def test_mail_with_parameters_and_space_after_colon() -> None:
    conn = greeted()
    events, _ = feed(
        conn, b"MAIL FROM: <a@x.test> SIZE=1000 BODY=8BITMIME RET=FULL ENVID=x+2By\r\n"
    )
    assert events == [MailFrom(address="a@x.test", size=1000, body="8BITMIME", ret="FULL",
                               envid="x+y")]  # fmt: skip


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (b"MAIL FROM:<a@x.test> SIZE=1001\r\n", replies.MESSAGE_TOO_BIG),
        (b"MAIL FROM:<a@x.test> FOO=BAR\r\n", replies.PARAM_NOT_RECOGNIZED),
        (b"MAIL FROM:a@x.test\r\n", replies.BAD_ARGUMENTS),
        (b"MAIL FROM:<a@x..test>\r\n", replies.BAD_ADDRESS),
        (b"MAIL TO:<a@x.test>\r\n", replies.BAD_ARGUMENTS),
        (b"MAIL\r\n", replies.BAD_ARGUMENTS),
        (b"MAIL FROM:<j\xc3\xb6rg@x.test>\r\n", replies.UTF8_NOT_REQUESTED),
        (b"MAIL FROM:<j\xffrg@x.test>\r\n", replies.UTF8_NOT_REQUESTED),
        (b"MAIL FROM:<j\xffrg@x.test> SMTPUTF8\r\n", replies.BAD_ADDRESS),
    ],
)
def test_mail_refusals(data: bytes, reply: Reply) -> None:
    conn = greeted()
    events, out = feed(conn, data)
    assert events == [] and out == [line(reply)] and state(conn) is State.GREETED


def test_mail_utf8_with_smtputf8_and_rcpt_follows() -> None:
    conn = greeted()
    events, out = feed(
        conn, "MAIL FROM:<jörg@x.test> SMTPUTF8\r\nRCPT TO:<zoë@y.test>\r\n".encode()
    )
    assert events == [MailFrom(address="jörg@x.test", smtputf8=True), RcptTo(address="zoë@y.test")]
    conn = greeted()
    _, out = feed(conn, "MAIL FROM:<a@x.test>\r\nRCPT TO:<zoë@y.test>\r\n".encode())
    assert out == [line(replies.SENDER_OK), line(replies.UTF8_NOT_REQUESTED)]


def test_null_sender_and_size_at_the_limit() -> None:
    conn = greeted()
    events, _ = feed(conn, b"MAIL FROM:<> SIZE=1000\r\n")
    assert events == [MailFrom(address="", size=1000)]


def test_mail_sequence() -> None:
    conn = machine()
    _, out = feed(conn, b"MAIL FROM:<a@x.test>\r\n")
    assert out == [line(replies.BAD_SEQUENCE)]  # before EHLO
    feed(conn, b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\n")
    _, out = feed(conn, b"MAIL FROM:<a@x.test>\r\n")
    assert out == [line(replies.BAD_SEQUENCE)]  # nested


def test_mail_refused_by_adapter_allows_another() -> None:
    conn = greeted()
    conn.receive_data(b"MAIL FROM:<bad@x.test>\r\nMAIL FROM:<good@x.test>\r\n")
    assert conn.next_event() == MailFrom(address="bad@x.test")
    with pytest.raises(UsageError):
        conn.next_event()  # pipelined, but the first is not answered yet
    conn.send(replies.SENDER_NOT_ALLOWED)
    assert state(conn) is State.GREETED
    assert conn.next_event() == MailFrom(address="good@x.test")
    conn.send(replies.SENDER_OK)
    assert lines(conn) == [line(replies.SENDER_NOT_ALLOWED), line(replies.SENDER_OK)]


# --- RCPT ---------------------------------------------------------------------------------------
def test_rcpt_variants() -> None:
    conn = greeted()
    data = (b"MAIL FROM:<a@x.test>\r\nRCPT TO:<Postmaster>\r\n"
            b"RCPT TO:<@r1.test,@r2.test:b@y.test> NOTIFY=FAILURE ORCPT=rfc822;b+40y.test\r\n"
            b"RCPT TO:<>\r\n")  # fmt: skip
    events, out = feed(conn, data)
    assert events == [
        MailFrom(address="a@x.test"),
        RcptTo(address="postmaster"),
        RcptTo(address="b@y.test", notify=("FAILURE",), orcpt="rfc822;b@y.test"),
    ]
    assert out[-1] == line(replies.BAD_ADDRESS)


def test_rcpt_before_mail() -> None:
    conn = greeted()
    _, out = feed(conn, b"RCPT TO:<b@y.test>\r\n")
    assert out == [line(replies.BAD_SEQUENCE)]


def test_too_many_recipients() -> None:
    conn = greeted(max_recipients=2)
    data = b"MAIL FROM:<a@x.test>\r\n" + b"RCPT TO:<b@y.test>\r\n" * 3
    events, out = feed(conn, data)
    assert len([e for e in events if isinstance(e, RcptTo)]) == 2
    assert out[-1] == "452 4.5.3 Too many recipients"
    assert conn.error_count == 0  # 4xx is not a protocol error


def test_refused_recipients_count_at_data() -> None:
    conn = greeted()
    conn.receive_data(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
    assert conn.next_event() == MailFrom(address="a@x.test")
    conn.send(replies.SENDER_OK)
    assert conn.next_event() == RcptTo(address="b@y.test")
    conn.send(replies.RELAY_DENIED)
    assert conn.next_event() is NEED_DATA
    assert lines(conn)[-1] == "554 5.5.1 No valid recipients"
    _, out = feed(conn, b"RCPT TO:<bad>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n")
    assert out == [line(replies.BAD_ADDRESS), line(replies.RECIPIENT_OK), line(replies.START_DATA)]


def test_data_sequence() -> None:
    conn = greeted()
    _, out = feed(conn, b"DATA\r\nMAIL FROM:<a@x.test>\r\nDATA\r\nRCPT TO:<b@y.test>\r\nDATA x\r\n")
    assert out == [line(replies.BAD_SEQUENCE), line(replies.SENDER_OK), line(replies.BAD_SEQUENCE),
                   line(replies.RECIPIENT_OK), line(replies.BAD_ARGUMENTS)]  # fmt: skip


# --- DATA ---------------------------------------------------------------------------------------
def test_message_in_one_chunk() -> None:
    conn = in_data()
    events, out = feed(conn, b"Subject: a\r\n\r\nline\r\n..dot\r\n.\r\n")
    assert events == [MessageChunk(b"Subject: a\r\n\r\nline\r\n.dot\r\n"), EndOfData()]
    assert out == ["250 2.0.0 Ok: queued as TESTQID"]
    assert state(conn) is State.GREETED
    events, _ = feed(conn, b"MAIL FROM:<a@x.test>\r\n")  # RFC 5321 §4.1.1.4: MAIL may follow
    assert events == [MailFrom(address="a@x.test")]


def test_message_byte_by_byte() -> None:
    conn = in_data()
    conn.data_to_send()
    message = b"a\r\n.b\r\n\r\n..\r\n"
    wire = message.replace(b"\r\n.", b"\r\n..") + b".\r\nNOOP\r\n"
    chunks = b""
    events: list[Event] = []
    for i in range(len(wire)):
        new = drive(conn, wire[i : i + 1])
        events += new
        chunks += b"".join(e.data for e in new if isinstance(e, MessageChunk))
    assert chunks == message
    assert events[-1] == EndOfData()
    assert lines(conn) == ["250 2.0.0 Ok: queued as TESTQID", "250 2.0.0 Ok"]


def test_empty_message() -> None:
    conn = in_data()
    events, _ = feed(conn, b".\r\n")
    assert events == [EndOfData()]


def test_data_refused_by_adapter_keeps_transaction() -> None:
    conn = greeted()
    conn.receive_data(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
    for answer in (replies.SENDER_OK, replies.RECIPIENT_OK):
        conn.next_event()
        conn.send(answer)
    assert conn.next_event() == DataStart()
    conn.send(RATE_LIMITED)
    assert state(conn) is State.RCPT
    _, out = feed(conn, b"DATA\r\n")
    assert out[-1] == line(replies.START_DATA)


@pytest.mark.parametrize(
    "smuggled",
    [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n", b"\r\n.\n", b"\n\r\n.\r\n"],
)
def test_smuggling_closes(smuggled: bytes) -> None:
    conn = in_data()
    conn.data_to_send()
    events, out = feed(conn, b"Subject: x\r\n\r\nbody" + smuggled + b"MAIL FROM:<e@x.test>\r\n")
    assert events == [Close(reason="bare CR or LF in message data")]
    assert out == [
        "554 5.5.2 Bare CR or LF in message data, closing connection (see RFC 5321 section 2.3.8)"
    ]
    assert conn.is_closed
    assert feed(conn, b"\r\n.\r\n") == ([], [])


def test_nul_in_data_closes() -> None:
    conn = in_data()
    conn.data_to_send()
    events, out = feed(conn, b"a\0b\r\n.\r\n")
    assert events == [Close(reason="NUL in message data")]
    assert out == [line(replies.NUL_IN_DATA)]


def test_too_big_message() -> None:
    conn = in_data(max_message_size=100)
    conn.data_to_send()
    events, out = feed(conn, b"x" * 60 + b"\r\n")
    assert events == [MessageChunk(b"x" * 60 + b"\r\n")]
    events, out = feed(conn, b"y" * 60 + b"\r\n" + b"z\r\n" * 1000)
    assert events == []
    events, out = feed(conn, b".\r\n")
    assert events == [EndOfData(too_big=True)]
    assert out == ["552 5.3.4 Message too big"]
    assert state(conn) is State.GREETED


def test_long_text_line() -> None:
    conn = in_data(max_message_size=10**6)
    conn.data_to_send()
    events, out = feed(conn, b"a" * 999 + b"\r\n.\r\n")
    assert events == [MessageChunk(b"a" * 999 + b"\r\n"), EndOfData(bad_line=True)]
    assert out == [line(replies.TEXT_LINE_TOO_LONG)]


def test_end_of_data_refused_ends_transaction() -> None:
    conn = in_data()
    conn.data_to_send()
    conn.receive_data(b"x\r\n.\r\nRCPT TO:<b@y.test>\r\n")
    assert conn.next_event() == MessageChunk(b"x\r\n")
    assert conn.next_event() == EndOfData()
    conn.send(replies.virus_found("Eicar-Test-Signature"))
    assert state(conn) is State.GREETED
    assert conn.next_event() is NEED_DATA
    assert lines(conn)[-1] == line(replies.BAD_SEQUENCE)


def test_peer_closes_during_data() -> None:
    conn = in_data()
    events, _ = feed(conn, b"partial\r\n")
    events, out = feed(conn, b"")
    assert events == [Close(reason="peer closed during DATA", reply_sent=False)] and out == []


def test_pipelined_commands_after_the_message() -> None:
    conn = in_data()
    conn.data_to_send()
    events, out = feed(conn, b"x\r\n.\r\nMAIL FROM:<a@x.test>\r\nRSET\r\nQUIT\r\n")
    assert events == [MessageChunk(b"x\r\n"), EndOfData(), MailFrom(address="a@x.test"), Reset(),
                      Quit()]  # fmt: skip
    assert out == ["250 2.0.0 Ok: queued as TESTQID", line(replies.SENDER_OK), "250 2.0.0 Ok",
                   "221 2.0.0 Bye"]  # fmt: skip


# --- command lines ------------------------------------------------------------------------------
def test_line_of_512_is_fine_513_is_not() -> None:
    conn = greeted()
    ok = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
    assert len(ok) == 512
    _, out = feed(conn, ok)
    assert out == [line(replies.NOOP_OK)]
    _, out = feed(conn, b"NOOP " + b"x" * (513 - 7) + b"\r\nNOOP\r\n")
    assert out == ["500 5.5.2 Line too long", line(replies.NOOP_OK)]


def test_over_long_line_is_discarded_as_it_arrives() -> None:
    conn = greeted()
    _, out = feed(conn, b"NOOP " + b"x" * 600)
    assert out == ["500 5.5.2 Line too long"]  # at once, not at the end of the line
    for _ in range(100):
        assert feed(conn, b"QUIT " * 1000) == ([], [])
    events, out = feed(conn, b"QUIT\r\nNOOP\r\n")
    assert events == [] and out == [line(replies.NOOP_OK)]


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (b"NOOP\n", replies.SYNTAX_ERROR),
        (b"\n", replies.SYNTAX_ERROR),
        (b"\r\n", replies.SYNTAX_ERROR),
        (b" NOOP\r\n", replies.SYNTAX_ERROR),
        (b"NO\0OP\r\n", replies.SYNTAX_ERROR),
        (b"NOOP \0\r\n", replies.SYNTAX_ERROR),
        (b"NO\rOP\r\n", replies.SYNTAX_ERROR),
        (b"N\xc3\x96OP\r\n", replies.SYNTAX_ERROR),
        (b"FOO\r\n", replies.UNKNOWN_COMMAND),
        (b"BDAT 1 LAST\r\n", replies.UNKNOWN_COMMAND),
        (b"MAIL-FROM:<a@b.c>\r\n", replies.UNKNOWN_COMMAND),
        (b"GET\r\n", replies.UNKNOWN_COMMAND),
        (b"EXPN list\r\n", replies.NOT_IMPLEMENTED),
        (b"VRFY\r\n", replies.BAD_ARGUMENTS),
        (b"RSET x\r\n", replies.BAD_ARGUMENTS),
        (b"QUIT x\r\n", replies.BAD_ARGUMENTS),
    ],
)
def test_bad_command_lines(data: bytes, reply: Reply) -> None:
    conn = greeted()
    events, out = feed(conn, data + b"NOOP\r\n")
    assert events == [] and out == [line(reply), line(replies.NOOP_OK)]
    assert conn.error_count == 1


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (b"NOOP anything\r\n", replies.NOOP_OK),
        (b"noop\r\n", replies.NOOP_OK),
        (b"HELP\r\n", replies.HELP_INFO),
        (b"HELP MAIL\r\n", replies.HELP_INFO),
        (b"VRFY alice\r\n", replies.VRFY_DISABLED),
    ],
)
def test_machine_answered_commands(data: bytes, reply: Reply) -> None:
    conn = machine()
    events, out = feed(conn, data)
    assert events == [] and out == [line(reply)]


def test_rset_and_quit() -> None:
    conn = greeted()
    events, out = feed(conn, b"MAIL FROM:<a@x.test>\r\nRSET\r\nRCPT TO:<b@y.test>\r\n")
    assert events == [MailFrom(address="a@x.test"), Reset()]
    assert out == [line(replies.SENDER_OK), "250 2.0.0 Ok", line(replies.BAD_SEQUENCE)]
    events, out = feed(conn, b"QUIT\r\nNOOP\r\n")
    assert events == [Quit()] and out == ["221 2.0.0 Bye"] and conn.is_closed
    assert feed(conn, b"NOOP\r\n") == ([], [])
    assert conn.next_event() is NEED_DATA


def test_rset_before_ehlo() -> None:
    conn = machine()
    events, out = feed(conn, b"RSET\r\n")
    assert events == [Reset()] and out == ["250 2.0.0 Ok"] and state(conn) is State.CONNECTED


@pytest.mark.parametrize(
    "request_line",
    [b"GET / HTTP/1.1", b"POST /x HTTP/1.0", b"HEAD / HTTP/1.1", b"CONNECT a:25 HTTP/1.1"],
)
def test_http_is_refused_at_once(request_line: bytes) -> None:
    conn = machine()
    events, out = feed(conn, request_line + b"\r\nHost: x\r\n\r\n")
    assert events == [Close(reason="HTTP request")]
    assert out == ["554 5.7.0 This is an SMTP server, closing connection"]
    conn = machine()
    events, _ = feed(conn, request_line[:8] + b"x" * 2000)  # no line end needed
    assert isinstance(events[0], Close)


def test_peer_close_after_buffered_commands() -> None:
    conn = greeted()
    conn.receive_data(b"NOOP\r\nMAIL FROM:<a@x.test>\r\nNOO")
    conn.receive_data(b"")
    conn.receive_data(b"P\r\n")  # ignored: after the close
    events, out = feed(conn, b"")
    assert events == [MailFrom(address="a@x.test"), Close(reason="peer closed", reply_sent=False)]
    assert out == [line(replies.NOOP_OK), line(replies.SENDER_OK)]


# --- the error budget ---------------------------------------------------------------------------
def test_too_many_errors() -> None:
    conn = greeted(max_errors=3)
    events, out = feed(conn, b"FOO\r\nBAR\r\nNOOP\r\nBAZ\r\nNOOP\r\n")
    assert events == [Close(reason="too many errors")]
    assert out == [
        *[line(replies.UNKNOWN_COMMAND)] * 2,
        line(replies.NOOP_OK),
        line(replies.UNKNOWN_COMMAND),
        "421 4.5.0 Too many errors, closing connection",
    ]
    assert conn.is_closed and conn.error_count == 3


def test_adapter_errors_count() -> None:
    conn = greeted(SUBMISSIONS, max_errors=2)
    bad = base64.b64encode(b"\0alice\0nope").decode()
    events, out = feed(conn, f"AUTH PLAIN {bad}\r\nAUTH PLAIN {bad}\r\nNOOP\r\n".encode())
    assert events[-1] == Close(reason="too many errors") and len(events) == 3
    assert out == [line(replies.BAD_CREDENTIALS)] * 2 + [line(replies.TOO_MANY_ERRORS)]


def test_temporary_errors_do_not_count() -> None:
    conn = greeted(max_errors=1)
    conn.receive_data(b"MAIL FROM:<a@x.test>\r\n")
    conn.next_event()
    conn.send(RATE_LIMITED)
    assert conn.error_count == 0 and conn.next_event() is NEED_DATA


# --- API misuse ---------------------------------------------------------------------------------
def test_usage_errors() -> None:
    conn = ServerConnection(SMARTHOST, HOST, max_message_size=10)
    with pytest.raises(UsageError):
        conn.next_event()
    with pytest.raises(UsageError):
        conn.receive_data(b"x")
    conn.start()
    with pytest.raises(UsageError):
        conn.start()
    with pytest.raises(UsageError):
        conn.send(replies.OK)
    with pytest.raises(UsageError):
        conn.tls_started()
    conn.receive_data(b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
    conn.next_event()
    with pytest.raises(UsageError):
        conn.send(replies.START_DATA)  # 354 is no answer to EHLO
    conn.send(replies.OK)
    conn.next_event()
    conn.send(replies.OK)
    conn.next_event()
    conn.send(replies.OK)
    assert conn.next_event() == DataStart()
    with pytest.raises(UsageError):
        conn.send(replies.OK)  # DataStart needs 354 or an error
    with pytest.raises(UsageError):
        conn.send(Reply(199, "2.0.0", "odd"))
    conn.send(replies.START_DATA)
    with pytest.raises(UsageError, match="positive"):
        ServerConnection(SMARTHOST, HOST, max_message_size=0)


def test_transitions_table_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(State)
    for targets in TRANSITIONS.values():
        assert set(targets.values()) <= set(State)


# --- properties ---------------------------------------------------------------------------------
REPLY_LINE = re.compile(r"[2-5][0-9][0-9][ -][^\r\n]*|334 [A-Za-z0-9+/=]*")
ANSWERS = [replies.OK, replies.SENDER_OK, replies.START_DATA, replies.AUTH_SUCCEEDED,
           replies.BAD_CREDENTIALS, replies.RELAY_DENIED, RATE_LIMITED,
           replies.queued("Q"), replies.INTERNAL_ERROR]  # fmt: skip
TOKENS = [b"EHLO a.test\r\n", b"HELO a\r\n", b"MAIL FROM:<a@b.c>\r\n", b"RCPT TO:<d@e.f>\r\n",
          b"DATA\r\n", b".\r\n", b"\r\n", b"\n", b"\r", b"\0", b".", b"RSET\r\n", b"STARTTLS\r\n",
          b"AUTH PLAIN\r\n", b"AUTH LOGIN YWxpY2U=\r\n", PLAIN_ALICE.encode(), b"*\r\n", b"x" * 600,
          b"NOOP\r\n", b"QUIT\r\n", b"GET / HTTP/1.1\r\n", b"\xff\xfe",
          b"SIZE=99999999", b"AUTH XOAUTH2\r\n", b"AQ==\r\n",
          b"AUTH OAUTHBEARER bixhPWFsaWNlLAFhdXRoPUJlYXJlciB3cm9uZwEB\r\n",
          b"dXNlcj1hbGljZQFhdXRoPUJlYXJlciBzZWNyZXQBAQ==\r\n"]  # fmt: skip
noise = st.lists(st.sampled_from(TOKENS) | st.binary(max_size=40), max_size=40).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(PROFILES)),
    noise,
    st.lists(st.integers(min_value=0, max_value=4000), max_size=8),
    st.data(),
)
def test_any_input_gives_replies_or_close(
    profile: str, data: bytes, cuts: list[int], choices: st.DataObject
) -> None:
    conn = ServerConnection(PROFILES[profile], HOST, max_message_size=500, max_errors=5,
                            token_auth=True)  # fmt: skip
    conn.start()
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in [*itertools.pairwise(points), (len(data), len(data))]:
        conn.receive_data(data[a:b])  # the last, empty, piece is the hang-up
        for _ in range(len(data) + 10):
            event = conn.next_event()
            if event is NEED_DATA:
                break
            assert isinstance(event, Event)
            if isinstance(event, StartTls):
                conn.tls_started()
            elif conn.pending_event is not None:
                answer = choices.draw(st.sampled_from(ANSWERS))
                positive = 3 if isinstance(event, DataStart) else 2
                if answer.code // 100 in (2, 3) and answer.code // 100 != positive:
                    answer = replies.START_DATA if positive == 3 else replies.OK
                conn.send(answer)
        else:
            raise AssertionError("no NEED_DATA")
    out = conn.data_to_send().decode("utf-8")
    assert out.startswith("220 ") and out.endswith("\r\n")
    for reply_line in out.split("\r\n")[:-1]:
        assert REPLY_LINE.fullmatch(reply_line), reply_line
    assert conn.is_closed or conn.state is not State.NEW


SESSION = (b"EHLO c.test\r\nNOOP\r\nMAIL FROM:<a@x.test> SIZE=10\r\nRCPT TO:<b@y.test>\r\n"
           b"RCPT TO:<bad>\r\nDATA\r\nSubject: s\r\n\r\n..x\r\n" + b"y" * 1200 + b"\r\n.\r\n"
           b"FOO\r\n" + b"NOOP " + b"z" * 700 + b"\r\nRSET\r\nQUIT\r\n")  # fmt: skip


def summarise(events: list[Event]) -> tuple[list[Event], bytes]:
    """Events without chunk boundaries: the chunks joined, the other events in order."""
    text = b"".join(e.data for e in events if isinstance(e, MessageChunk))
    return [e for e in events if not isinstance(e, MessageChunk)], text


@given(st.lists(st.integers(min_value=0, max_value=len(SESSION)), max_size=30))
def test_chunking_never_changes_the_session(cuts: list[int]) -> None:
    whole = machine(max_message_size=10**6)
    expected_events = summarise(drive(whole, SESSION))
    expected_out = whole.data_to_send()
    conn = machine(max_message_size=10**6)
    points = sorted(set(cuts) | {0, len(SESSION)})
    events: list[Event] = []
    for a, b in itertools.pairwise(points):
        events += drive(conn, SESSION[a:b])
    assert summarise(events) == expected_events
    assert conn.data_to_send() == expected_out
    assert expected_events[0][-1] == Quit()


@given(st.binary(min_size=1, max_size=200), st.sampled_from([SUBMISSION, SMARTHOST]))
def test_nothing_after_starttls_is_executed(after: bytes, profile: Profile) -> None:
    conn = machine(profile)
    events, out = feed(conn, b"EHLO c.test\r\nSTARTTLS\r\n" + after)
    assert [type(e) for e in events] == [Ehlo, Close]
    assert out[-1] == line(replies.PIPELINED_STARTTLS) and not conn.is_tls


def test_fake_answer_is_the_runner_one() -> None:
    # the helper these tests rely on answers EndOfData by its flags
    conn = in_data(max_message_size=5)
    conn.receive_data(b"123456\r\n.\r\n")
    assert conn.next_event() == EndOfData(too_big=True)
    fake_answer(conn, EndOfData(too_big=True))
    assert lines(conn)[-1] == "552 5.3.4 Message too big"


# --- bearer tokens --------------------------------------------------------------------------
def test_token_mechanisms_only_when_configured() -> None:
    plain = machine(SUBMISSIONS)
    _, out = feed(plain, b"EHLO c.test\r\n")
    assert out[-1] == "250 AUTH PLAIN LOGIN"
    _, out = feed(plain, b"AUTH OAUTHBEARER bjosAWF1dGg9QmVhcmVyIHNlY3JldAEB\r\n")
    assert out == ["504 5.5.4 Unrecognized authentication type"]
    tokens = machine(SUBMISSIONS, token_auth=True)
    _, out = feed(tokens, b"EHLO c.test\r\n")
    assert out[-1] == "250 AUTH PLAIN LOGIN OAUTHBEARER XOAUTH2"


def test_oauthbearer_initial_response_and_continuation() -> None:
    response = base64.b64encode(b"n,a=alice,\x01auth=Bearer secret\x01\x01").decode()
    conn = greeted(SUBMISSIONS, token_auth=True)
    events, out = feed(conn, b"AUTH OAUTHBEARER\r\n")
    assert events == [] and out == ["334 "] and state(conn) is State.SASL
    events, out = feed(conn, response.encode() + b"\r\n")
    assert events == [Auth(mechanism="OAUTHBEARER", login="alice", password="secret")]
    assert out == ["235 2.7.0 Authentication successful"]
    assert (conn.login, conn.auth_mechanism) == ("alice", "OAUTHBEARER")


def test_xoauth2_initial_response() -> None:
    response = base64.b64encode(b"user=alice\x01auth=Bearer secret\x01\x01").decode()
    conn = greeted(SUBMISSIONS, token_auth=True)
    events, out = feed(conn, f"AUTH XOAUTH2 {response}\r\n".encode())
    assert events == [Auth(mechanism="XOAUTH2", login="alice", password="secret")]
    assert out == ["235 2.7.0 Authentication successful"]


def test_token_mechanisms_not_before_tls() -> None:
    conn = greeted(SUBMISSION, token_auth=True)
    _, out = feed(conn, b"AUTH XOAUTH2\r\n")
    assert out == ["530 5.7.0 Must issue a STARTTLS command first"]


# --- a failed bearer token: RFC 7628 §3.2.2's error challenge ---------------------------------
BAD_TOKEN_OAUTHBEARER = base64.b64encode(b"n,a=alice,\x01auth=Bearer wrong\x01\x01").decode()
GOOD_TOKEN_OAUTHBEARER = base64.b64encode(b"n,a=alice,\x01auth=Bearer secret\x01\x01").decode()
BAD_TOKEN_XOAUTH2 = base64.b64encode(b"user=alice\x01auth=Bearer wrong\x01\x01").decode()
BASE_ERROR = {"status": "invalid_token", "schemes": "bearer"}


def token_machine(**options: Any) -> ServerConnection:
    conn = ServerConnection(SUBMISSIONS, HOST, max_message_size=1000, token_auth=True, **options)
    conn.start()
    feed(conn, b"EHLO client.test\r\n")
    return conn


def error_challenge(out: list[str]) -> dict[str, str]:
    """The JSON object of the one 334 line in `out`."""
    assert len(out) == 1 and out[0].startswith("334 "), out
    decoded = json.loads(base64.b64decode(out[0][4:], validate=True))
    assert isinstance(decoded, dict)
    return decoded


def test_a_failed_oauthbearer_token_gets_the_error_challenge_then_535() -> None:
    conn = token_machine()
    events, out = feed(conn, f"AUTH OAUTHBEARER {BAD_TOKEN_OAUTHBEARER}\r\n".encode())
    assert events == [Auth(mechanism="OAUTHBEARER", login="alice", password="wrong")]
    assert out == ["334 eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIiwic2NoZW1lcyI6ImJlYXJlciJ9"]
    assert error_challenge(out) == BASE_ERROR
    assert state(conn) is State.SASL and conn.error_count == 0
    events, out = feed(conn, b"AQ==\r\n")  # the dummy response: %x01 (RFC 7628 §3.2.3)
    assert events == [] and out == ["535 5.7.8 Authentication credentials invalid"]
    assert state(conn) is State.GREETED and conn.login is None and conn.error_count == 1
    # The session goes on: a good token now logs in.
    events, out = feed(conn, f"AUTH OAUTHBEARER {GOOD_TOKEN_OAUTHBEARER}\r\n".encode())
    assert out == ["235 2.7.0 Authentication successful"] and conn.login == "alice"


def test_a_failed_xoauth2_token_gets_the_error_challenge_then_535() -> None:
    conn = token_machine()
    events, out = feed(conn, b"AUTH XOAUTH2\r\n")  # msmtp's way: the response on its own line
    assert events == [] and out == ["334 "]
    events, out = feed(conn, f"{BAD_TOKEN_XOAUTH2}\r\n".encode())
    assert events == [Auth(mechanism="XOAUTH2", login="alice", password="wrong")]
    assert error_challenge(out) == BASE_ERROR
    events, out = feed(conn, b"\r\n")  # Google's dummy response: an empty line
    assert events == [] and out == ["535 5.7.8 Authentication credentials invalid"]
    assert state(conn) is State.GREETED and conn.error_count == 1


def test_the_error_challenge_names_the_configured_scope_and_discovery_document() -> None:
    discovery = "https://sso.example.ac.uk/realms/staff/.well-known/openid-configuration"
    conn = token_machine(token_scope="mailgate-smtp", token_openid_configuration=discovery)
    _, out = feed(conn, f"AUTH OAUTHBEARER {BAD_TOKEN_OAUTHBEARER}\r\n".encode())
    assert error_challenge(out) == {**BASE_ERROR, "scope": "mailgate-smtp",
                                    "openid-configuration": discovery}  # fmt: skip


def test_an_abort_after_the_error_challenge_gets_501() -> None:
    conn = token_machine()
    feed(conn, f"AUTH OAUTHBEARER {BAD_TOKEN_OAUTHBEARER}\r\n".encode())
    events, out = feed(conn, b"*\r\n")  # the SASL abort (RFC 4954 §4)
    assert events == [] and out == ["501 5.0.0 Authentication cancelled"]
    assert state(conn) is State.GREETED and conn.error_count == 1


@pytest.mark.parametrize("answer", [GOOD_TOKEN_OAUTHBEARER, "", "not base64!", "MAIL FROM:<a@b>"])
def test_anything_else_after_the_error_challenge_gets_535_and_is_never_decoded(
    answer: str,
) -> None:
    conn = token_machine()
    feed(conn, f"AUTH OAUTHBEARER {BAD_TOKEN_OAUTHBEARER}\r\n".encode())
    # Even a good token in that slot is not a second try: no Auth event, the failure stands.
    events, out = feed(conn, f"{answer}\r\n".encode())
    assert events == [] and out == ["535 5.7.8 Authentication credentials invalid"]
    assert state(conn) is State.GREETED and conn.login is None and conn.error_count == 1


def test_a_temporary_failure_of_a_token_gets_no_error_challenge() -> None:
    # The key set unreachable: 454 4.7.0 at once, the exchange over, nothing counted.
    conn = token_machine()
    conn.receive_data(f"AUTH OAUTHBEARER {BAD_TOKEN_OAUTHBEARER}\r\n".encode())
    assert isinstance(conn.next_event(), Auth)
    conn.send(replies.AUTH_TEMPORARILY_UNAVAILABLE)
    assert lines(conn) == ["454 4.7.0 Temporary authentication failure"]
    assert conn.next_event() is NEED_DATA and state(conn) is State.GREETED
    assert conn.error_count == 0


def test_a_failed_password_gets_no_error_challenge() -> None:
    conn = token_machine()
    wrong = base64.b64encode(b"\0alice\0wrong").decode()
    _, out = feed(conn, f"AUTH PLAIN {wrong}\r\n".encode())
    assert out == ["535 5.7.8 Authentication credentials invalid"]


def test_each_failed_token_counts_once_against_the_error_budget() -> None:
    conn = token_machine(max_errors=2)
    feed(conn, f"AUTH OAUTHBEARER {BAD_TOKEN_OAUTHBEARER}\r\nAQ==\r\n".encode())
    assert conn.error_count == 1 and not conn.is_closed
    _, out = feed(conn, f"AUTH XOAUTH2 {BAD_TOKEN_XOAUTH2}\r\n".encode())
    assert error_challenge(out) == BASE_ERROR
    events, out = feed(conn, b"\r\n")
    assert out == ["535 5.7.8 Authentication credentials invalid",
                   "421 4.5.0 Too many errors, closing connection"]  # fmt: skip
    assert [type(e) for e in events] == [Close] and conn.is_closed


def test_a_client_that_hangs_up_after_the_error_challenge_is_closed() -> None:
    conn = token_machine()
    feed(conn, f"AUTH OAUTHBEARER {BAD_TOKEN_OAUTHBEARER}\r\n".encode())
    events, out = feed(conn, b"")
    assert [type(e) for e in events] == [Close] and out == [] and conn.is_closed


# --- REQUIRETLS (RFC 8689 §4.1) --------------------------------------------------------------


def test_requiretls_is_advertised_only_under_tls_on_the_submission_services() -> None:
    conn = machine(SUBMISSION)
    _, before = feed(conn, b"EHLO client.test\r\nSTARTTLS\r\n")
    assert not any("REQUIRETLS" in line for line in before)
    _, after = feed(conn, b"EHLO client.test\r\n")
    assert "250-REQUIRETLS" in after
    _, implicit = feed(machine(SUBMISSIONS), b"EHLO client.test\r\n")
    assert "250-REQUIRETLS" in implicit
    smarthost = greeted(SMARTHOST)
    _, relay = feed(smarthost, b"STARTTLS\r\nEHLO client.test\r\n")
    assert not any("REQUIRETLS" in line for line in relay)


def test_mail_requiretls_sets_the_flag_where_offered() -> None:
    conn = authenticated()
    events, out = feed(conn, b"MAIL FROM:<alice@example.org> REQUIRETLS\r\n")
    assert out == ["250 2.1.0 Sender ok"]
    [mail] = [e for e in events if isinstance(e, MailFrom)]
    assert mail.requiretls is True
    events, _ = feed(conn, b"RSET\r\nMAIL FROM:<alice@example.org>\r\n")
    [mail] = [e for e in events if isinstance(e, MailFrom)]
    assert mail.requiretls is False


def test_mail_requiretls_is_an_unknown_parameter_where_not_offered() -> None:
    conn = greeted(SMARTHOST)
    events, out = feed(conn, b"MAIL FROM:<alice@example.org> REQUIRETLS\r\n")
    assert out == ["555 5.5.4 MAIL FROM/RCPT TO parameters not recognized or not implemented"]
    assert not any(isinstance(e, MailFrom) for e in events)

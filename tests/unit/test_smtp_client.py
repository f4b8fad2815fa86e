"""ClientConnection without sockets: replies in, events out; commands in, exact bytes out.

Also property tests (hypothesis): no reply bytes crash the machine or grow its buffer past the
limit; replies split at any byte boundary give the same events; the message text round-trips
through dot-stuffing and the server's DATA reader.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.errors import UsageError
from mailgate.replies import Reply
from mailgate.smtp.client import (
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    NEED_DATA,
    ClientConnection,
    ClientEvent,
    Command,
    ConnectionClosed,
    EhloReply,
    Greeting,
    QuitReply,
    ServerReply,
    StartTlsReply,
    State,
    TextWanted,
    TransactionDone,
    encode_message,
    to_reply,
)
from mailgate.smtp.data import DataEncoder, DataReader

EHLO_PIPELINING = (
    b"250-sink.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n"
    b"250-STARTTLS\r\n250 ENHANCEDSTATUSCODES\r\n"
)
EHLO_PLAIN = b"250-sink.test\r\n250 8BITMIME\r\n"
MESSAGE = b"Subject: hi\r\n\r\nHello.\r\n"


def events(conn: ClientConnection) -> list[ClientEvent]:
    out: list[ClientEvent] = []
    for _ in range(1000):  # bounded: the machine yields a handful per reply
        event = conn.next_event()
        if event is NEED_DATA:
            return out
        out.append(event)
    raise AssertionError("endless events")


def feed(conn: ClientConnection, data: bytes) -> list[ClientEvent]:
    conn.receive_data(data)
    return events(conn)


def done_of(conn: ClientConnection, data: bytes) -> TransactionDone:
    """Feed replies that end the transaction: exactly one TransactionDone."""
    [event] = feed(conn, data)
    assert isinstance(event, TransactionDone)
    return event


def r(code: int, *lines: str) -> ServerReply:
    return ServerReply(code, lines)


def ready(ehlo: bytes = EHLO_PIPELINING) -> ClientConnection:
    """A machine after the greeting and a positive EHLO."""
    conn = ClientConnection()
    assert feed(conn, b"220 sink.test ESMTP\r\n") == [Greeting(r(220, "sink.test ESMTP"))]
    conn.ehlo("mail.example.org")
    assert conn.data_to_send() == b"EHLO mail.example.org\r\n"
    [event] = feed(conn, ehlo)
    assert isinstance(event, EhloReply) and event.reply.is_positive
    assert conn.state is State.READY
    return conn


def transaction(conn: ClientConnection, *rcpts: str, message: bytes = MESSAGE) -> None:
    conn.send_transaction("alice@sender.test", ["SIZE=24"], [(a, []) for a in rcpts], message)


# --- greeting and EHLO ---------------------------------------------------------------------------


def test_greeting_then_ehlo_lists_capabilities() -> None:
    conn = ready()
    assert conn.capabilities == {
        "PIPELINING": "",
        "SIZE": "10240000",
        "8BITMIME": "",
        "STARTTLS": "",
        "ENHANCEDSTATUSCODES": "",
    }
    assert conn.is_pipelining
    assert conn.supports("size") and conn.supports("8bitmime") and not conn.supports("dsn")


def test_refusing_greeting_allows_only_quit() -> None:
    conn = ClientConnection()
    [event] = feed(conn, b"554 5.3.2 No service\r\n")
    assert event == Greeting(r(554, "5.3.2 No service"))
    assert event.reply.to_reply() == Reply(554, "5.3.2", "No service")
    assert conn.state is State.REFUSED
    with pytest.raises(UsageError):
        conn.ehlo("mail.example.org")
    conn.quit()
    assert conn.data_to_send() == b"QUIT\r\n"
    assert feed(conn, b"221 2.0.0 Bye\r\n") == [QuitReply(r(221, "2.0.0 Bye"))]
    assert conn.is_closed
    assert feed(conn, b"250 late\r\n") == []  # input after the end is ignored


@pytest.mark.parametrize("code", [500, 502])
def test_ehlo_not_known_falls_back_to_helo(code: int) -> None:
    conn = ClientConnection()
    feed(conn, b"220 old.test\r\n")
    conn.ehlo("mail.example.org")
    conn.data_to_send()
    assert feed(conn, f"{code} 5.5.1 What?\r\n".encode()) == []
    assert conn.data_to_send() == b"HELO mail.example.org\r\n"
    [event] = feed(conn, b"250 old.test\r\n")
    assert event == EhloReply(r(250, "old.test"), {}, is_extended=False)
    assert conn.state is State.READY and not conn.is_pipelining


def test_refused_ehlo_is_not_retried_as_helo() -> None:
    conn = ClientConnection()
    feed(conn, b"220 x\r\n")
    conn.ehlo("mail.example.org")
    conn.data_to_send()
    [event] = feed(conn, b"421 4.3.2 Busy\r\n")
    assert event == EhloReply(r(421, "4.3.2 Busy"), {}, is_extended=True)
    assert conn.data_to_send() == b""
    assert conn.state is State.CONNECTED


def test_commands_in_the_wrong_state_are_usage_errors() -> None:
    conn = ClientConnection()
    calls: list[Callable[[], None]] = [
        lambda: conn.ehlo("x"),
        conn.quit,
        lambda: transaction(conn, "bob@dest.test"),
        conn.tls_started,
    ]
    for call in calls:
        with pytest.raises(UsageError):
            call()
    conn = ready()
    transaction(conn, "bob@dest.test")
    with pytest.raises(UsageError):  # one transaction at a time
        transaction(conn, "bob@dest.test")
    with pytest.raises(UsageError):
        ready().send_transaction("a@b.test", [], [], MESSAGE)
    assert not conn.may(Command.QUIT) and ready().may(Command.QUIT)


# --- replies --------------------------------------------------------------------------------------


def test_multiline_reply_with_bare_lf_and_controls() -> None:
    conn = ClientConnection()
    [event] = feed(conn, b"220-first\n220-se\x1bcond\xff\r\n220 third\r\n")
    assert event == Greeting(r(220, "first", "se cond\ufffd", "third"))


def test_to_reply_takes_the_enhanced_code_of_the_same_class() -> None:
    assert to_reply(550, ["5.1.1 No such user"]) == Reply(550, "5.1.1", "No such user")
    assert to_reply(451, ["5.1.1 wrong class"]) == Reply(451, "4.0.0", "5.1.1 wrong class")
    assert to_reply(250, ["2.0.0 Ok", "queued"]) == Reply(250, "2.0.0", "Ok queued")
    assert to_reply(554, []) == Reply(554, "5.0.0", "")
    assert to_reply(354, ["go ahead"]) == Reply(354, "4.0.0", "go ahead")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"2x0 oops\r\n", "malformed reply line"),
        (b"150 one\r\n", "malformed reply line"),
        (b"220x\r\n", "malformed reply line"),
        (b"220-one\r\n250 two\r\n", "reply code changed inside a multi-line reply"),
        (b"220 " + b"a" * MAX_REPLY_LINE + b"\r\n", "reply line too long"),
        (b"220-x\r\n" * MAX_REPLY_LINES + b"220 x\r\n", "reply too long"),
        (b"220 hi\r\n250 unasked\r\n", "reply without a command"),
    ],
)
def test_protocol_violations_close(data: bytes, reason: str) -> None:
    conn = ClientConnection()
    got = feed(conn, data)
    assert got[-1] == ConnectionClosed(reason)
    assert conn.is_closed


def test_a_line_without_end_is_bounded() -> None:
    conn = ClientConnection()
    chunk = b"2" * 1000
    for _ in range(MAX_REPLY_LINE // len(chunk)):  # up to the limit the line may yet end
        assert feed(conn, chunk) == []
    assert feed(conn, chunk) == [ConnectionClosed("reply line too long")]
    assert feed(conn, chunk * 1000) == []


def test_unsolicited_421_closes() -> None:
    conn = ready()
    assert feed(conn, b"421 4.4.2 Idle too long\r\n") == [
        ConnectionClosed("server closing: 421 4.4.2 Idle too long")
    ]
    assert not conn.may(Command.TRANSACTION)


# --- transactions -----------------------------------------------------------------------------


def test_pipelined_transaction_is_two_writes() -> None:
    conn = ready()
    conn.send_transaction(
        "alice@sender.test",
        ["SIZE=24", "BODY=8BITMIME"],
        [("bob@dest.test", ["NOTIFY=NEVER"]), ("carol@dest.test", [])],
        MESSAGE,
    )
    assert conn.data_to_send() == (
        b"MAIL FROM:<alice@sender.test> SIZE=24 BODY=8BITMIME\r\n"
        b"RCPT TO:<bob@dest.test> NOTIFY=NEVER\r\n"
        b"RCPT TO:<carol@dest.test>\r\n"
        b"DATA\r\n"
    )
    assert feed(conn, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 No\r\n") == []
    assert conn.data_to_send() == b""
    assert feed(conn, b"354 Go\r\n") == []
    assert conn.data_to_send() == MESSAGE + b".\r\n"
    done = done_of(conn, b"250 2.0.0 Ok: queued\r\n")
    assert done == TransactionDone(
        mail=r(250, "2.1.0 Ok"),
        rcpts=(r(250, "2.1.5 Ok"), r(550, "5.1.1 No")),
        data=r(354, "Go"),
        message=r(250, "2.0.0 Ok: queued"),
    )
    assert conn.state is State.READY
    # The transaction ended with the reply to the dot: no RSET before the next one.
    transaction(conn, "dave@dest.test")
    assert conn.data_to_send().startswith(b"MAIL FROM:")


def test_one_command_per_round_trip_without_pipelining() -> None:
    conn = ready(EHLO_PLAIN)
    transaction(conn, "bob@dest.test", "carol@dest.test")
    assert conn.data_to_send() == b"MAIL FROM:<alice@sender.test> SIZE=24\r\n"
    assert feed(conn, b"250 ok\r\n") == []
    assert conn.data_to_send() == b"RCPT TO:<bob@dest.test>\r\n"
    assert feed(conn, b"451 4.3.0 later\r\n") == []
    assert conn.data_to_send() == b"RCPT TO:<carol@dest.test>\r\n"
    assert feed(conn, b"250 ok\r\n") == []
    assert conn.data_to_send() == b"DATA\r\n"
    assert feed(conn, b"354 go\r\n") == []
    assert conn.data_to_send() == MESSAGE + b".\r\n"
    done = done_of(conn, b"250 done\r\n")
    assert done == TransactionDone(
        r(250, "ok"), (r(451, "4.3.0 later"), r(250, "ok")), r(354, "go"), r(250, "done")
    )


def test_refused_mail_without_pipelining_sends_nothing_more() -> None:
    conn = ready(EHLO_PLAIN)
    transaction(conn, "bob@dest.test", "carol@dest.test")
    conn.data_to_send()
    done = done_of(conn, b"550 5.7.1 Go away\r\n")
    assert done == TransactionDone(r(550, "5.7.1 Go away"), (None, None), None, None)
    assert conn.data_to_send() == b""
    transaction(conn, "bob@dest.test")  # the server never entered a transaction: no RSET
    assert conn.data_to_send().startswith(b"MAIL FROM:")


def test_every_rcpt_refused_without_pipelining_means_no_data_and_rset_later() -> None:
    conn = ready(EHLO_PLAIN)
    transaction(conn, "bob@dest.test")
    conn.data_to_send()
    feed(conn, b"250 ok\r\n")
    conn.data_to_send()
    done = done_of(conn, b"550 5.1.1 No\r\n")
    assert done == TransactionDone(r(250, "ok"), (r(550, "5.1.1 No"),), None, None)
    assert conn.data_to_send() == b""
    transaction(conn, "carol@dest.test")
    assert conn.data_to_send() == b"RSET\r\n"  # MAIL waits for its reply
    assert feed(conn, b"250 2.0.0 Ok\r\n") == []
    assert conn.data_to_send() == b"MAIL FROM:<alice@sender.test> SIZE=24\r\n"


def test_pipelined_rset_goes_in_front_of_the_next_mail() -> None:
    conn = ready()
    transaction(conn, "bob@dest.test")
    conn.data_to_send()
    done = done_of(conn, b"250 ok\r\n550 5.1.1 No\r\n554 5.5.1 No valid recipients\r\n")
    assert done.data == r(554, "5.5.1 No valid recipients") and done.message is None
    assert conn.data_to_send() == b""
    transaction(conn, "carol@dest.test")
    assert conn.data_to_send() == (
        b"RSET\r\nMAIL FROM:<alice@sender.test> SIZE=24\r\nRCPT TO:<carol@dest.test>\r\nDATA\r\n"
    )
    feed(conn, b"250 reset\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert conn.data_to_send() == MESSAGE + b".\r\n"
    done = done_of(conn, b"250 queued\r\n")
    assert done.message == r(250, "queued")


def test_pipelined_data_accepted_without_recipients_gets_a_lone_dot() -> None:
    conn = ready()
    transaction(conn, "bob@dest.test")
    conn.data_to_send()
    assert feed(conn, b"250 ok\r\n550 no\r\n354 go\r\n") == []
    assert conn.data_to_send() == b".\r\n"  # RFC 2920 §3.1
    done = done_of(conn, b"554 no recipients\r\n")
    assert done == TransactionDone(r(250, "ok"), (r(550, "no"),), r(354, "go"), None)
    transaction(conn, "carol@dest.test")
    assert conn.data_to_send().startswith(b"MAIL")  # the dot ended the transaction


def test_pipelined_refused_mail_waits_for_the_rest_of_the_group() -> None:
    conn = ready()
    transaction(conn, "bob@dest.test")
    conn.data_to_send()
    assert feed(conn, b"451 4.3.0 later\r\n503 5.5.1 no MAIL\r\n") == []
    done = done_of(conn, b"503 5.5.1 no MAIL\r\n")
    assert done == TransactionDone(
        r(451, "4.3.0 later"), (r(503, "5.5.1 no MAIL"),), r(503, "5.5.1 no MAIL"), None
    )
    assert conn.data_to_send() == b""
    transaction(conn, "bob@dest.test")
    assert conn.data_to_send().startswith(b"MAIL")


def test_refused_final_dot_needs_no_rset() -> None:
    conn = ready()
    transaction(conn, "bob@dest.test")
    conn.data_to_send()
    feed(conn, b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert conn.data_to_send() == MESSAGE + b".\r\n"
    done = done_of(conn, b"554 5.7.1 spam\r\n")
    assert done.message == r(554, "5.7.1 spam")
    transaction(conn, "bob@dest.test")
    assert conn.data_to_send().startswith(b"MAIL")


def test_refused_rset_closes() -> None:
    conn = ready()
    transaction(conn, "bob@dest.test")
    conn.data_to_send()
    feed(conn, b"250 ok\r\n550 no\r\n554 none\r\n")
    transaction(conn, "carol@dest.test")
    conn.data_to_send()
    assert feed(conn, b"500 5.5.1 What\r\n") == [
        TransactionDone(None, (None,), None, None),
        ConnectionClosed("RSET refused: 500 5.5.1 What"),
    ]


def test_a_2xx_to_data_is_a_violation_not_a_success() -> None:
    conn = ready()
    transaction(conn, "bob@dest.test")
    conn.data_to_send()
    assert feed(conn, b"250 ok\r\n250 ok\r\n250 ok\r\n") == [
        TransactionDone(r(250, "ok"), (r(250, "ok"),), None, None),
        ConnectionClosed("unexpected reply to DATA: 250"),
    ]
    assert conn.data_to_send() == b""  # the message never goes


def test_close_in_the_middle_yields_what_is_known() -> None:
    conn = ready()
    transaction(conn, "bob@dest.test", "carol@dest.test")
    conn.data_to_send()
    feed(conn, b"250 ok\r\n550 no\r\n")
    assert feed(conn, b"") == [
        TransactionDone(r(250, "ok"), (r(550, "no"), None), None, None),
        ConnectionClosed("connection closed by the server"),
    ]
    with pytest.raises(UsageError):
        transaction(conn, "bob@dest.test")


def test_abort_after_the_dot_leaves_its_reply_unknown() -> None:
    conn = ready()
    transaction(conn, "bob@dest.test")
    conn.data_to_send()
    feed(conn, b"250 ok\r\n250 ok\r\n354 go\r\n")
    conn.abort("timed out")
    assert events(conn) == [
        TransactionDone(r(250, "ok"), (r(250, "ok"),), r(354, "go"), None),
        ConnectionClosed("timed out"),
    ]


@pytest.mark.parametrize(
    ("mail_from", "rcpt", "params"),
    [
        ("a@b.test\r\nRSET", "bob@dest.test", []),
        ("a@b.test", "bob@dest.test>\r\nDATA", []),
        ("a b@b.test", "bob@dest.test", []),
        ("a@b.test", "bob@dest.test", ["NOTIFY=NEVER\r\nDATA"]),
        ("a@b.test", "bob@dest.test", ["SIZE=1 BODY=7BIT"]),
        ("a@b.test", "bob@dest.test", [""]),
        ("a@b.test", "b\udcffob@dest.test", []),
    ],
)
def test_command_injection_is_refused(mail_from: str, rcpt: str, params: list[str]) -> None:
    conn = ready()
    with pytest.raises(UsageError):
        conn.send_transaction(mail_from, [], [(rcpt, params)], MESSAGE)
    assert conn.data_to_send() == b""
    assert conn.state is State.READY


def test_utf8_addresses_go_as_utf8() -> None:
    conn = ready()
    conn.send_transaction("jörg@sender.test", ["SMTPUTF8"], [("zoë@dest.test", [])], MESSAGE)
    assert conn.data_to_send().startswith("MAIL FROM:<jörg@sender.test> SMTPUTF8\r\n".encode())


# --- STARTTLS and QUIT ---------------------------------------------------------------------------


def test_starttls_forgets_capabilities_and_wants_ehlo() -> None:
    conn = ready()
    conn.starttls()
    assert conn.data_to_send() == b"STARTTLS\r\n"
    assert feed(conn, b"220 2.0.0 Ready\r\n") == [StartTlsReply(r(220, "2.0.0 Ready"))]
    assert conn.state is State.TLS_PENDING
    conn.tls_started()
    assert conn.is_tls and conn.capabilities == {} and conn.may(Command.EHLO)
    conn.ehlo("mail.example.org")
    assert conn.data_to_send() == b"EHLO mail.example.org\r\n"
    feed(conn, b"250-sink.test\r\n250 PIPELINING\r\n")
    with pytest.raises(UsageError):
        conn.starttls()  # already under TLS


def test_refused_starttls_keeps_the_plaintext_session() -> None:
    conn = ready()
    conn.starttls()
    assert feed(conn, b"454 4.7.0 TLS not available\r\n") == [
        StartTlsReply(r(454, "4.7.0 TLS not available"))
    ]
    assert conn.state is State.READY
    assert conn.may(Command.TRANSACTION)


def test_starttls_only_when_offered() -> None:
    with pytest.raises(UsageError):
        ready(EHLO_PLAIN).starttls()


def test_reply_injected_after_starttls_in_the_same_read_closes() -> None:
    conn = ready()
    conn.starttls()
    assert feed(conn, b"220 Ready\r\n250-fake\r\n250 AUTH PLAIN\r\n") == [
        StartTlsReply(r(220, "Ready")),
        ConnectionClosed("data after the reply to STARTTLS"),
    ]


def test_plaintext_before_the_handshake_closes_after_it() -> None:
    conn = ready()
    conn.starttls()
    feed(conn, b"220 Ready\r\n")
    assert feed(conn, b"250 injected\r\n") == []
    conn.tls_started()
    assert events(conn) == [ConnectionClosed("data after the reply to STARTTLS")]


def test_quit() -> None:
    conn = ready()
    conn.quit()
    assert conn.data_to_send() == b"QUIT\r\n"
    assert feed(conn, b"221 2.0.0 Bye\r\n") == [QuitReply(r(221, "2.0.0 Bye"))]
    assert conn.is_closed and not conn.may(Command.QUIT)


# --- the message text -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "wire"),
    [
        (
            b"Subject: x\n\nline1\n.\nline2\r.\r\nline3\r\n.leading dot\r\nlast",
            b"Subject: x\r\n\r\nline1\r\n..\r\nline2\r\n..\r\nline3\r\n..leading dot\r\n"
            b"last\r\n.\r\n",
        ),
        (b".\r\n", b"..\r\n.\r\n"),
        (b"a\r\r\nb", b"a\r\n\r\nb\r\n.\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b"", b".\r\n"),
    ],
)
def test_encode_message(stored: bytes, wire: bytes) -> None:
    assert encode_message(stored) == wire


def encoded_in_chunks(message: bytes, cuts: Sequence[int], clean_from: int | None = None) -> bytes:
    encoder = DataEncoder(clean_from)
    points = sorted({min(c, len(message)) for c in cuts})
    out, start = [], 0
    for point in [*points, len(message)]:
        out.append(encoder.feed(message[start:point]))
        start = point
    return b"".join(out) + encoder.finish()


@pytest.mark.parametrize(
    ("pieces", "wire"),
    [
        # CRLF "." CRLF inside the text, split at every place: always stuffed.
        ([b"a\r", b"\n.\r\nb\r\n"], b"a\r\n..\r\nb\r\n.\r\n"),
        ([b"a\r\n", b".\r\nb\r\n"], b"a\r\n..\r\nb\r\n.\r\n"),
        ([b"a\r\n.", b"\r\nb\r\n"], b"a\r\n..\r\nb\r\n.\r\n"),
        ([b"a\r\n.\r", b"\nb\r\n"], b"a\r\n..\r\nb\r\n.\r\n"),
        # A line starting with "." at the start of a chunk, and a dot that does not start one.
        ([b"x\r\n", b".dot\r\n", b".", b"y\r\n"], b"x\r\n..dot\r\n..y\r\n.\r\n"),
        ([b"x", b".y\r\n"], b"x.y\r\n.\r\n"),
        ([b".", b"first\r\n"], b"..first\r\n.\r\n"),
        # Bare LF and bare CR become CRLF, as for a whole message, wherever the cut falls.
        ([b"a\n", b".b\n"], b"a\r\n..b\r\n.\r\n"),
        ([b"a\r", b"\r", b"b"], b"a\r\n\r\nb\r\n.\r\n"),
        ([b"a\r"], b"a\r\n.\r\n"),
        ([b"", b"", b""], b".\r\n"),
    ],
)
def test_data_encoder_handles_chunk_boundaries(pieces: list[bytes], wire: bytes) -> None:
    encoder = DataEncoder()
    assert b"".join(encoder.feed(p) for p in pieces) + encoder.finish() == wire
    assert encode_message(b"".join(pieces)) == wire


@settings(max_examples=500)
@given(
    message=st.lists(
        st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"..", b"\r\n.\r\n", b"x" * 5]),
        max_size=40,
    ).map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
)
def test_data_encoder_in_chunks_equals_the_whole(message: bytes, cuts: list[int]) -> None:
    # The reference: the rules applied to the whole text with plain bytes methods.
    normalised = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if normalised and not normalised.endswith(b"\r\n"):
        normalised += b"\r\n"
    if normalised.startswith(b"."):
        normalised = b"." + normalised
    reference = normalised.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    assert encoded_in_chunks(message, cuts) == reference


@settings(max_examples=500)
@given(
    head=st.lists(
        st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"\r\n.\r\n"]), max_size=12
    ).map(b"".join),
    lines=st.lists(st.sampled_from([b"", b".", b"..", b"a", b".a", b"x" * 5]), max_size=20),
    end=st.sampled_from([b"", b"\r\n", b"tail", b"."]),
    cuts=st.lists(st.integers(min_value=0, max_value=120), max_size=8),
)
def test_data_encoder_with_a_clean_body_equals_full_normalisation(
    head: bytes, lines: list[bytes], end: bytes, cuts: list[int]
) -> None:
    # A head with any line ends, then a body with CR and LF only as CRLF (what DATA let
    # through): only dot-stuffing after clean_from gives the very bytes of full normalisation,
    # wherever the chunks are cut and even when a CRLF straddles clean_from.
    body = b"".join(line + b"\r\n" for line in lines) + end
    message = head + body
    reference = encoded_in_chunks(message, cuts)
    assert encoded_in_chunks(message, cuts, clean_from=len(head)) == reference
    assert encode_message(message, len(head)) == encode_message(message)


@pytest.mark.parametrize(
    ("stored", "clean_from", "wire"),
    [
        # Before clean_from every line end is normalised, after it only dots are stuffed.
        (b"A: b\nC: d\n\r\n.x\r\ny", 10, b"A: b\r\nC: d\r\n\r\n..x\r\ny\r\n.\r\n"),
        # A CRLF across clean_from is one line end.
        (b"a\r\n.b\r\n", 2, b"a\r\n..b\r\n.\r\n"),
        # The promise is trusted: a bare LF after clean_from goes out as it is (a message
        # received over SMTP cannot have one; see deliver/engine.py _RECEIVED_OVER_SMTP).
        (b"a\n\r\nb\nc", 4, b"a\r\n\r\nb\nc\r\n.\r\n"),
        (b"a\nb", 0, b"a\nb\r\n.\r\n"),
        (b"a\nb", 99, b"a\r\nb\r\n.\r\n"),
    ],
)
def test_data_encoder_only_stuffs_dots_after_clean_from(
    stored: bytes, clean_from: int, wire: bytes
) -> None:
    assert encode_message(stored, clean_from) == wire
    assert encoded_in_chunks(stored, [1, 3, 5], clean_from) == wire


def test_streamed_text_goes_after_the_354_in_chunks() -> None:
    conn = ready()
    conn.send_transaction("alice@sender.test", [], [("bob@dest.test", [])], None)
    assert conn.data_to_send() == (
        b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<bob@dest.test>\r\nDATA\r\n"
    )
    assert not conn.is_sending_text
    assert feed(conn, b"250 ok\r\n250 ok\r\n354 go\r\n") == [TextWanted()]
    assert conn.is_sending_text and conn.data_to_send() == b""
    for piece in (b"Subject: big\r\n\r\nline\r", b"\n.dot\r\n", b"last"):
        conn.send_text(piece)
    conn.end_text()
    assert not conn.is_sending_text
    assert conn.data_to_send() == b"Subject: big\r\n\r\nline\r\n..dot\r\nlast\r\n.\r\n"
    done = done_of(conn, b"250 2.0.0 queued\r\n")
    assert done == TransactionDone(
        r(250, "ok"), (r(250, "ok"),), r(354, "go"), r(250, "2.0.0 queued")
    )


def test_streamed_text_is_not_asked_for_when_data_is_refused() -> None:
    conn = ready()
    conn.send_transaction("alice@sender.test", [], [("bob@dest.test", [])], None)
    conn.data_to_send()
    done = done_of(conn, b"250 ok\r\n250 ok\r\n554 5.3.0 no\r\n")
    assert done.data == r(554, "5.3.0 no") and done.message is None
    with pytest.raises(UsageError):
        conn.send_text(b"x")


def test_streamed_text_after_the_connection_closed_is_ignored() -> None:
    conn = ready()
    conn.send_transaction("alice@sender.test", [], [("bob@dest.test", [])], None)
    conn.data_to_send()
    assert feed(conn, b"250 ok\r\n250 ok\r\n354 go\r\n") == [TextWanted()]
    conn.send_text(b"half of it\r\n")
    conn.abort("timed out")
    conn.send_text(b"the rest\r\n")
    conn.end_text()
    [done, closed] = events(conn)
    assert done == TransactionDone(r(250, "ok"), (r(250, "ok"),), r(354, "go"), None)
    assert closed == ConnectionClosed("timed out")
    assert conn.data_to_send() == b""


# --- properties -------------------------------------------------------------------------------

# Arbitrary bytes, and sequences of pieces that look like replies more often than noise does.
_PIECES = [b"250", b"354", b"421", b"550", b"2", b"-", b" ", b"ok", b"\r\n", b"\n", b"\r",
           b"\x00", b"\xff", b"220 ", b"250-", b"x" * 300]  # fmt: skip
_REPLY_BYTES = st.binary(max_size=600) | st.lists(st.sampled_from(_PIECES), max_size=60).map(
    b"".join
)


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(_REPLY_BYTES, max_size=8), pipelined=st.booleans())
def test_any_reply_bytes_never_crash_the_machine(chunks: list[bytes], pipelined: bool) -> None:
    conn = ready(EHLO_PIPELINING if pipelined else EHLO_PLAIN)
    transaction(conn, "bob@dest.test", "carol@dest.test")
    for chunk in chunks:
        conn.receive_data(chunk)
        for event in events(conn):
            assert isinstance(
                event,
                Greeting | EhloReply | StartTlsReply | TransactionDone | QuitReply
                | ConnectionClosed,
            )  # fmt: skip
        conn.data_to_send()
        # The buffer holds at most one unfinished line (the memory bound).
        assert len(conn._in) < MAX_REPLY_LINE
        if conn.state is State.READY:
            transaction(conn, "dave@dest.test")
    conn.receive_data(b"")
    assert conn.is_closed


_LINE_TEXT = st.text(
    st.characters(codec="utf-8", exclude_characters="\r\n", exclude_categories=["Cc", "Cs"]),
    max_size=40,
)
_REPLIES = st.lists(
    st.tuples(st.sampled_from([250, 251, 452, 550, 553]), st.lists(_LINE_TEXT, min_size=1,
                                                                   max_size=5)),
    min_size=4,
    max_size=4,
)  # fmt: skip


def _reply_wire(code: int, lines: Sequence[str]) -> bytes:
    out = [f"{code}-{line}\r\n" for line in lines[:-1]] + [f"{code} {lines[-1]}\r\n"]
    return "".join(out).encode()


@settings(max_examples=200, deadline=None)
@given(replies=_REPLIES, cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
def test_replies_split_anywhere_parse_the_same(
    replies: list[tuple[int, list[str]]], cuts: list[int]
) -> None:
    replies = [(250, ["ok"]), *replies[1:]]  # MAIL accepted: every RCPT reply is awaited
    wire = b"".join(_reply_wire(code, lines) for code, lines in replies) + b"354 go\r\n"

    def run(chunks: list[bytes]) -> list[ClientEvent]:
        conn = ready()
        transaction(conn, "a@dest.test", "b@dest.test", "c@dest.test")
        conn.data_to_send()
        got: list[ClientEvent] = []
        for chunk in chunks:
            got += feed(conn, chunk)
        return got + feed(conn, b"250 done\r\n")

    whole = run([wire])
    points = sorted({min(c, len(wire)) for c in cuts})
    pieces = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True) if b > a]
    assert run(pieces) == whole
    [done] = whole
    assert isinstance(done, TransactionDone)
    assert done.rcpts == tuple(ServerReply(code, tuple(lines)) for code, lines in replies[1:])


@settings(max_examples=300, deadline=None)
@given(
    message=st.lists(
        st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"..", b"\r\n.\r\n", b"x" * 50]),
        max_size=40,
    ).map(b"".join),
    cut=st.integers(min_value=0, max_value=4000),
)
def test_dot_stuffing_round_trips_through_the_data_reader(message: bytes, cut: int) -> None:
    wire = encode_message(message)
    # Strict CRLF: no bare CR or LF, and the end-of-data line only at the very end.
    assert wire.count(b"\r") == wire.count(b"\n") == wire.count(b"\r\n")
    assert (b"\r\n" + wire).find(b"\r\n.\r\n") == len(wire) - 3
    reader = DataReader(max_message_size=10_000_000)
    cut = min(cut, len(wire))
    first, second = reader.feed(wire[:cut]), None
    if not first.is_done:
        second = reader.feed(wire[cut:])
    text = first.chunk + (second.chunk if second is not None else b"")
    assert (second or first).is_done and (second or first).leftover == b""
    normalised = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if normalised and not normalised.endswith(b"\r\n"):
        normalised += b"\r\n"
    assert text == normalised

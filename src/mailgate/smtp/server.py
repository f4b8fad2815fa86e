"""The SMTP server protocol as a sans-IO state machine: bytes in, events out; replies in, bytes out.

Nothing here performs I/O, reads the clock, or consults the directory.

Owns: command framing and limits, command syntax (through `parse`), sequencing, the SASL
exchanges, STARTTLS safety, the DATA reader (through `data`), the protocol error budget, and
the EHLO capability list. Must not: decide policy (who may send, relay or log in), touch the
spool, or know about sockets, TLS objects or asyncio (receive/session.py does).

Use (STYLE.md §3)::

    conn.receive_data(chunk)                  # b"" means the peer closed
    while (event := conn.next_event()) is not NEED_DATA:
        ...                                   # answer events that need an answer: conn.send(r)
    writer.write(conn.data_to_send())

Rules of the API (a violation raises `UsageError`, a bug in the caller):
- `start()` once, before anything else; it queues the 220 greeting.
- An event that needs an answer (`Ehlo`, `Auth`, `MailFrom`, `RcptTo`, `DataStart`,
  `EndOfData`) must be answered with exactly one `send(reply)` before `next_event()` is called
  again. Nothing else may be sent: `send()` without such a pending event raises.
- A positive answer is 2xx, or 354 for `DataStart`; it moves the machine along TRANSITIONS.
  A 4xx/5xx answer leaves the state unchanged, except after `EndOfData`, where any answer ends
  the transaction (RFC 5321 §4.1.1.4), and a 5xx answer to a bearer-token `Auth` (OAUTHBEARER,
  XOAUTH2), which the machine holds back behind RFC 7628's error challenge (below). A 3xx
  answer to anything but `DataStart` (or a 2xx to `DataStart`) is a usage error.
- `StartTls`, `MessageChunk`, `Reset`, `Quit` and `Close` need no answer. After `StartTls` the
  adapter upgrades the transport and calls `tls_started()`.
- After `Quit` or `Close` the machine is closed: `next_event()` returns NEED_DATA and input is
  ignored.

Replies the machine writes itself (the adapter never sends these):
- the 220 greeting; the EHLO capability list and the HELO line (after a 2xx to `Ehlo`; the
  adapter's reply text is not used, RFC 2034 §3 puts no status code on them);
- 220 2.0.0 for STARTTLS, 334 challenges during AUTH (the bearer-token error challenge
  included), 250 for RSET and NOOP, 221 for QUIT,
  252 2.5.0 for VRFY, 214 for HELP, 502 5.5.1 for EXPN;
- every syntax, sequence and limit error: 500 5.5.1 unknown command, 500 5.5.2 bad line
  (NUL, bare CR, bare LF line end, 8-bit verb, empty line), 500 5.5.2 line over 512 octets,
  500 5.5.6 AUTH line over 12288 octets, 501 5.5.4 / 501 5.1.3 bad arguments / address,
  501 5.0.0 AUTH cancelled, 501 5.5.2 bad base64 or SASL, 503 5.5.1 bad sequence (and
  AUTH_NOT_OFFERED, ALREADY_AUTHENTICATED, TLS_ALREADY_ACTIVE), 504 5.5.4 unknown mechanism,
  530 5.7.0 STARTTLS or AUTH required, 535 5.7.8 foreign SASL authzid, 552 5.3.4 SIZE over
  the limit, 553 5.6.7 UTF-8 without SMTPUTF8, 554 5.5.1 no valid recipients,
  555 5.5.4 unknown parameter, 452 4.5.3 too many recipients;
- closing replies, each followed by a `Close` event: 554 5.7.0 HTTP request, 554 5.5.1
  commands pipelined after STARTTLS, 554 5.5.2 bare CR/LF in DATA, 554 5.6.0 NUL in DATA,
  421 4.5.0 too many errors.

Decisions (documented, RFC references where the rule is enforced in the code):
- A command line is at most 512 octets with its CRLF (RFC 5321 §4.5.3.1.4); AUTH lines and
  SASL responses 12288 (RFC 4954 §4). A longer line is answered at once and the rest of it is
  discarded up to its LF without being buffered.
- A command line ending in a bare LF is refused (500 5.5.2) rather than repaired: lenient
  line ending parsing is what SMTP smuggling exploits, and RFC 5321 §2.3.8 requires CRLF.
- "GET ", "POST ", "HEAD ", "CONNECT " at the start of any command line (not only the first)
  close the connection at once (cross-protocol requests; an SMTP verb never looks like that).
- STARTTLS followed by any byte already received is refused with 554 5.5.1 and a close: the
  bytes are never parsed (RFC 3207 §5, CVE-2011-0411). Bytes received while waiting for
  `tls_started()` are treated the same way.
- The error budget counts every 5xx reply, whether the machine or the adapter produced it
  (bad credentials included). The `max_errors`-th one is followed by 421 4.5.0 and `Close`.
- EHLO/HELO during a transaction first yields `Reset` (no 250 is written for it) and then
  `Ehlo` (RFC 5321 §4.1.4). ESMTP parameters are accepted after HELO too, like Postfix.
- AUTH is advertised only under TLS (`offers_auth and (is_tls or not requires_tls_for_auth)`),
  allowed only outside a transaction (RFC 4954 §4) and only once per TLS session.
- A failed bearer token (the adapter answers its `Auth` with a 5xx, normally 535 5.7.8) is
  RFC 7628 §3.2.2's error flow, for XOAUTH2 too as Google documents it: the machine writes
  `334 <base64 JSON error>` ({"status":"invalid_token","schemes":"bearer"}, plus "scope" and
  "openid-configuration" when configured) instead of the reply, and writes the adapter's reply
  only after the client's next line. That line is meant to be the dummy response (%x01,
  "AQ==", for OAUTHBEARER, §3.2.3; an empty line for XOAUTH2); anything else but the SASL
  abort `*` (501 5.0.0) gets the same failure reply, because the exchange has failed whatever
  the client says, and is never decoded (msmtp, for one, answers OAUTHBEARER's challenge with
  an empty line). The adapter sees one `Auth` and gives one answer: its failure counting
  happens once, as for a wrong password. A 4xx answer (backend unreachable: 454 4.7.0) is
  written at once, with no challenge.
- A closed peer (`receive_data(b"")`) still gets its complete buffered commands processed in
  order, then `Close` (reply_sent=False).
"""

from __future__ import annotations

import base64
import enum
import functools
import json
from collections import deque
from collections.abc import Callable
from typing import Final

from mailgate import replies
from mailgate.errors import ProtocolViolation, UsageError
from mailgate.replies import Reply
from mailgate.smtp import parse
from mailgate.smtp.data import DataReader, Violation
from mailgate.smtp.events import (
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


class _NeedData(enum.Enum):
    """The type of NEED_DATA: next_event() has nothing to return until more bytes arrive.
    A one-member enum, so that `event is not NEED_DATA` narrows the type for mypy."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData.NEED_DATA


class State(enum.Enum):
    """Where the session is. Positive answers move it along TRANSITIONS."""

    NEW = "new"  # start() not called yet
    CONNECTED = "connected"  # greeting sent (or TLS just started): EHLO/HELO expected
    GREETED = "greeted"  # EHLO/HELO accepted, no mail transaction
    SASL = "sasl"  # inside an AUTH exchange: the next line is a SASL response
    MAIL = "mail"  # MAIL accepted, no recipient accepted yet
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # 354 sent: reading message text
    TLS_PENDING = "tls-pending"  # 220 sent for STARTTLS: waiting for tls_started()
    CLOSED = "closed"  # Quit or Close was yielded

    # TRANSITIONS is looked up by state several times per command: hash by identity (members
    # are singletons and compare by identity) in C, not Enum's Python-level hash of the name.
    __hash__ = object.__hash__


# In a state (outer key), an event (inner key) may be yielded; once it is answered positively
# (or yielded, for events that need no answer) the machine moves to the inner value. A command
# whose event is not listed for the current state is answered 503 5.5.1 by the machine.
# Special cases, kept out of the table because they are not events: AUTH without an initial
# response enters SASL and the machine returns to GREETED when the exchange completes (before
# yielding Auth) or fails; a 5xx answer to a bearer-token Auth enters SASL again, for the one
# line that answers the error challenge; tls_started() moves TLS_PENDING to CONNECTED; EndOfData
# moves on any answer, positive or not.
TRANSITIONS: Final[dict[State, dict[type[Event], State]]] = {
    State.NEW: {},
    State.CONNECTED: {
        Ehlo: State.GREETED,
        StartTls: State.TLS_PENDING,
        Reset: State.CONNECTED,
        Quit: State.CLOSED,
        Close: State.CLOSED,
    },
    State.GREETED: {
        Ehlo: State.GREETED,
        StartTls: State.TLS_PENDING,
        Auth: State.GREETED,
        MailFrom: State.MAIL,
        Reset: State.GREETED,
        Quit: State.CLOSED,
        Close: State.CLOSED,
    },
    State.SASL: {Close: State.CLOSED},
    State.MAIL: {
        Ehlo: State.GREETED,
        RcptTo: State.RCPT,
        Reset: State.GREETED,
        Quit: State.CLOSED,
        Close: State.CLOSED,
    },
    State.RCPT: {
        Ehlo: State.GREETED,
        RcptTo: State.RCPT,
        DataStart: State.DATA,
        Reset: State.GREETED,
        Quit: State.CLOSED,
        Close: State.CLOSED,
    },
    State.DATA: {MessageChunk: State.DATA, EndOfData: State.GREETED, Close: State.CLOSED},
    State.TLS_PENDING: {Close: State.CLOSED},
    State.CLOSED: {},
}

# Events that must be answered with send(), and the reply class that counts as positive.
_POSITIVE_CLASS: Final[dict[type[Event], int]] = {
    Ehlo: 2,
    Auth: 2,
    MailFrom: 2,
    RcptTo: 2,
    DataStart: 3,
    EndOfData: 2,
}

MAX_COMMAND_LINE: Final = 512  # RFC 5321 §4.5.3.1.4, CRLF included
MAX_AUTH_LINE: Final = 12288  # RFC 4954 §4
_HTTP_METHODS: Final = (b"GET ", b"POST ", b"HEAD ", b"CONNECT ")
_SASL_CONTINUE: Final = b"334 \r\n"  # RFC 4954 §4: empty challenge for PLAIN
_LOGIN_USERNAME: Final = b"334 VXNlcm5hbWU6\r\n"  # base64("Username:")
_LOGIN_PASSWORD: Final = b"334 UGFzc3dvcmQ6\r\n"  # base64("Password:")
_TOKEN: Final = frozenset(parse.TOKEN_MECHANISMS)


@functools.cache  # the same two configured strings for every connection (issue #19)
def token_error_challenge(scope: str = "", openid_configuration: str = "") -> bytes:
    """The 334 line that tells a bearer-token client why it failed (RFC 7628 §3.2.2): base64 of
    a JSON object with "status" (an OAuth error code, RFC 6750 §3.1: the token is invalid,
    expired or not for us), "schemes" (the HTTP authentication scheme, RFC 7628 §4.4's SMTP
    example), and, when configured, "scope" (a scope that would be valid; omitted, a client
    takes it that no particular scope is needed) and "openid-configuration" (where the client
    can discover the provider)."""
    error = {"status": "invalid_token", "schemes": "bearer"}
    if scope:
        error["scope"] = scope
    if openid_configuration:
        error["openid-configuration"] = openid_configuration
    text = json.dumps(error, separators=(",", ":"), ensure_ascii=True)
    return b"334 " + base64.b64encode(text.encode("ascii")) + b"\r\n"


class ServerConnection:
    """One SMTP server session without I/O.

    profile:          what the service offers and demands (events.Profile).
    hostname:         our name, for the greeting and the EHLO reply.
    max_message_size: SIZE limit (RFC 1870); larger messages end in EndOfData(too_big=True).
    max_recipients:   accepted recipients per transaction; more get 452 4.5.3.
    max_errors:       5xx replies before 421 4.5.0 and Close.
    token_auth:       also offer OAUTHBEARER and XOAUTH2 (bearer tokens, RFC 7628); the token
                      arrives as Auth.password.
    token_scope, token_openid_configuration: the "scope" and "openid-configuration" members
                      of the error challenge a failed token gets ("" leaves them out).

    Public attributes (read them, do not assign): is_tls, login, ehlo_domain,
    auth_mechanism, error_count, state, is_closed.
    """

    def __init__(
        self,
        profile: Profile,
        hostname: str,
        *,
        max_message_size: int,
        max_recipients: int = 100,
        max_errors: int = 10,
        token_auth: bool = False,
        token_scope: str = "",
        token_openid_configuration: str = "",
    ) -> None:
        if max_message_size < 1 or max_recipients < 1 or max_errors < 1:
            raise UsageError("ServerConnection limits must be positive")
        self.profile = profile
        self.hostname = hostname
        self.max_message_size = max_message_size
        self.max_recipients = max_recipients
        self.max_errors = max_errors
        self.mechanisms = parse.SASL_MECHANISMS + (parse.TOKEN_MECHANISMS if token_auth else ())
        self._token_error = token_error_challenge(token_scope, token_openid_configuration)
        self.is_tls = profile.implicit_tls
        self.login: str | None = None
        self.auth_mechanism: str | None = None
        self.ehlo_domain: str | None = None
        self.error_count = 0
        self._state = State.NEW
        self._in = bytearray()
        self._out = bytearray()
        self._eof = False
        self._discarding = False  # inside the rest of an over-long command line
        self._plaintext_after_starttls = False
        self._events: deque[Event] = deque()
        self._pending: Event | None = None
        # the mail transaction
        self._mail: MailFrom | None = None
        self._rcpt_accepted = 0
        self._rcpt_refused = 0
        self._reader: DataReader | None = None
        # the SASL exchange in progress (state SASL)
        self._sasl_mechanism = ""
        self._sasl_username: str | None = None
        # A failed bearer token's reply, held back until the client answers the error challenge
        self._sasl_failure: Reply | None = None

    # --- public properties ------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def is_closed(self) -> bool:
        return self._state is State.CLOSED

    @property
    def pending_event(self) -> Event | None:
        """The event waiting for send(), if any."""
        return self._pending

    # --- the API ------------------------------------------------------------------------------
    def start(self) -> None:
        """Queue the 220 greeting (RFC 5321 §4.3.1). Call once, first."""
        if self._state is not State.NEW:
            raise UsageError("start() called twice")
        self._state = State.CONNECTED
        self._out += replies.greeting(self.hostname)

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; b"" means the peer closed its side."""
        if self._state is State.NEW:
            raise UsageError("receive_data() before start()")
        if self._state is State.CLOSED or self._eof:
            return
        if not data:
            self._eof = True
            return
        if self._state is State.TLS_PENDING:
            # RFC 3207 §5: nothing sent before the TLS handshake may be acted upon.
            self._plaintext_after_starttls = True
            return
        if self._discarding:
            # The rest of an over-long command line is dropped here, never buffered.
            lf = data.find(b"\n")
            if lf < 0:
                return
            self._discarding = False
            data = data[lf + 1 :]
        self._in += data

    def next_event(self) -> Event | _NeedData:
        """The next event, or NEED_DATA. Raises UsageError while an event is unanswered."""
        if self._pending is not None:
            raise UsageError(f"next_event() before answering {type(self._pending).__name__}")
        if self._state is State.NEW:
            raise UsageError("next_event() before start()")
        # Bounded: every step consumes input, queues an event or returns NEED_DATA.
        for _ in range(len(self._in) + 3):
            if self._events:
                event = self._events.popleft()
                if type(event) in _POSITIVE_CLASS:
                    self._pending = event
                return event
            if not self._step():
                return NEED_DATA
        raise AssertionError("SMTP machine made no progress")  # a bug, never the peer's fault

    def send(self, reply: Reply) -> None:
        """Answer the pending event."""
        event = self._pending
        if event is None:
            raise UsageError(f"send({reply.line()!r}) without an event waiting for an answer")
        positive = _is_positive(event, reply)
        self._pending = None
        if isinstance(event, Auth) and event.mechanism in _TOKEN and reply.code >= 500:
            # RFC 7628 §3.2.2: the error travels in a challenge; the failure follows the
            # client's dummy response (_sasl_response).
            self._out += self._token_error
            self._state = State.SASL
            self._sasl_mechanism = event.mechanism
            self._sasl_failure = reply
            return
        if isinstance(event, Ehlo) and positive:
            self._out += self._ehlo_reply(event)
        else:
            self._out += reply.to_bytes()
        self._answered(event, reply, positive)
        if reply.code >= 500:
            self._count_error()

    def data_to_send(self) -> bytes:
        """The bytes to write to the peer; empties the outgoing buffer."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def tls_started(self) -> None:
        """The adapter upgraded the transport after StartTls. RFC 3207 §4.2: forget EHLO, AUTH
        and the transaction; the client must EHLO again."""
        if self._state is not State.TLS_PENDING:
            raise UsageError(f"tls_started() in state {self._state.name}")
        self.is_tls = True
        self.ehlo_domain = None
        self.login = None
        self.auth_mechanism = None
        self._clear_transaction()
        if self._plaintext_after_starttls:
            self._close("plaintext received during TLS negotiation", replies.PIPELINED_STARTTLS)
        else:
            self._state = State.CONNECTED

    # --- answers ------------------------------------------------------------------------------
    def _answered(self, event: Event, reply: Reply, positive: bool) -> None:
        match event:
            case Ehlo(domain=domain) if positive:
                self.ehlo_domain = domain
            case Auth(mechanism=mechanism, login=login) if positive:
                self.login = login
                self.auth_mechanism = mechanism
            case MailFrom() if positive:
                self._mail = event
                self._rcpt_accepted = self._rcpt_refused = 0
            case RcptTo():
                if positive:
                    self._rcpt_accepted += 1
                else:
                    self._rcpt_refused += 1
            case DataStart() if positive:
                self._reader = DataReader(self.max_message_size)
            case EndOfData():
                self._clear_transaction()
                self._state = TRANSITIONS[self._state][EndOfData]
                return
        if positive:
            self._state = TRANSITIONS[self._state][type(event)]

    def _ehlo_reply(self, event: Ehlo) -> bytes:
        """RFC 5321 §4.1.1.1: the first line names us; EHLO lists the extensions."""
        if not event.extended:
            return f"250 {self.hostname}\r\n".encode()
        lines = [
            self.hostname,
            "PIPELINING",  # RFC 2920
            f"SIZE {self.max_message_size}",  # RFC 1870
            "8BITMIME",  # RFC 6152
            "SMTPUTF8",  # RFC 6531
            "ENHANCEDSTATUSCODES",  # RFC 2034
            "DSN",  # RFC 3461
        ]
        if self.profile.offers_starttls and not self.is_tls:
            lines.append("STARTTLS")  # RFC 3207
        if self._may_requiretls():
            lines.append("REQUIRETLS")  # RFC 8689 §4.1: only under TLS
        if self._may_auth():
            # RFC 4954; never before TLS (RFC 6409 §4.3)
            lines.append("AUTH " + " ".join(self.mechanisms))
        text = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}\r\n"
        return text.encode()

    def _may_requiretls(self) -> bool:
        return self.profile.offers_requiretls and self.is_tls

    def _may_auth(self) -> bool:
        return self.profile.offers_auth and (self.is_tls or not self.profile.requires_tls_for_auth)

    # --- the input loop ----------------------------------------------------------------------
    def _step(self) -> bool:
        """Do one unit of work. False when nothing can be done until more data arrives."""
        match self._state:
            case State.CLOSED:
                return False
            case State.TLS_PENDING:
                if self._plaintext_after_starttls:
                    self._close("plaintext received during TLS negotiation",
                                replies.PIPELINED_STARTTLS)  # fmt: skip
                    return True
                if self._eof:
                    self._close("peer closed during TLS negotiation", None)
                    return True
                return False
            case State.DATA:
                return self._step_data()
            case _:
                return self._step_line()

    def _step_data(self) -> bool:
        reader = self._reader
        assert reader is not None  # DataStart's 354 created it
        if not self._in:
            if self._eof:
                self._close("peer closed during DATA", None)
                return True
            return False
        progress = reader.feed(bytes(self._in))
        self._in.clear()
        if progress.violation is not None:
            nul = progress.violation is Violation.NUL
            self._close(progress.violation.value, replies.NUL_IN_DATA if nul else replies.SMUGGLING)
            return True
        if progress.chunk:
            self._events.append(MessageChunk(progress.chunk))
        if progress.is_done:
            self._in += progress.leftover
            self._events.append(EndOfData(too_big=reader.too_big, bad_line=reader.bad_line))
        return True

    def _step_line(self) -> bool:
        buf = self._in
        in_sasl = self._state is State.SASL
        if not in_sasl and buf.startswith(_HTTP_METHODS):
            self._close("HTTP request", replies.HTTP_REFUSED)
            return True
        is_auth = in_sasl or buf[:5].upper() == b"AUTH "
        limit = MAX_AUTH_LINE if is_auth else MAX_COMMAND_LINE
        lf = buf.find(b"\n")
        if lf < 0 or lf >= limit:
            if lf < 0 and len(buf) < limit:
                if self._eof:
                    self._close("peer closed", None)
                    return True
                return False
            # Over the limit: answer now and drop the line through its LF, or all of it and
            # the rest as it arrives (receive_data), so an endless line costs no memory.
            if lf < 0:
                buf.clear()
                self._discarding = True
            else:
                del buf[: lf + 1]
            self._end_sasl()
            self._refuse(replies.AUTH_LINE_TOO_LONG if is_auth else replies.LINE_TOO_LONG)
            return True
        line = bytes(buf[: lf + 1])
        del buf[: lf + 1]
        try:
            if line[-2:-1] != b"\r":
                raise ProtocolViolation(replies.SYNTAX_ERROR)  # bare LF (RFC 5321 §2.3.8)
            content = line[:-2]
            if b"\0" in content or b"\r" in content:
                raise ProtocolViolation(replies.SYNTAX_ERROR)
            if in_sasl:
                self._sasl_response(content)
            else:
                self._command(content)
        except ProtocolViolation as e:
            self._end_sasl()
            self._refuse(e.reply)
        return True

    # --- commands ------------------------------------------------------------------------------
    def _command(self, content: bytes) -> None:
        verb_bytes, _, arg_bytes = content.partition(b" ")
        if not verb_bytes or not verb_bytes.isascii():
            raise ProtocolViolation(replies.SYNTAX_ERROR)  # empty line, leading space, 8-bit
        if not verb_bytes.isalpha():
            raise ProtocolViolation(replies.UNKNOWN_COMMAND)
        verb = verb_bytes.decode("ascii").upper()
        # Undecodable bytes survive as lone surrogates, which no grammar in parse accepts.
        arg = arg_bytes.decode("utf-8", "surrogateescape")
        handler = _COMMANDS.get(verb)
        if handler is None:
            raise ProtocolViolation(replies.UNKNOWN_COMMAND)
        handler(self, arg)

    def _cmd_ehlo(self, arg: str) -> None:
        self._helo(arg, extended=True)

    def _cmd_helo(self, arg: str) -> None:
        self._helo(arg, extended=False)

    def _helo(self, arg: str, *, extended: bool) -> None:
        domain = parse.parse_ehlo_domain(arg)
        if self._state in (State.MAIL, State.RCPT):
            # RFC 5321 §4.1.4: EHLO in a transaction resets it, as RSET would.
            self._clear_transaction()
            self._state = TRANSITIONS[self._state][Reset]
            self._events.append(Reset())
        self._require(Ehlo)
        self._events.append(Ehlo(domain=domain, extended=extended))

    def _cmd_starttls(self, arg: str) -> None:
        if arg:
            raise ProtocolViolation(replies.BAD_ARGUMENTS)  # RFC 3207 §4: no parameters
        if self.is_tls:
            raise ProtocolViolation(replies.TLS_ALREADY_ACTIVE)
        if not self.profile.offers_starttls:
            raise ProtocolViolation(replies.NOT_IMPLEMENTED)
        self._require(StartTls)
        if self._in:
            # RFC 3207 §5 / CVE-2011-0411: bytes after STARTTLS in the same read were sent in
            # plaintext and must never be taken as commands of the TLS session.
            self._in.clear()
            self._close("commands pipelined after STARTTLS", replies.PIPELINED_STARTTLS)
            return
        self._out += replies.READY_FOR_TLS.to_bytes()
        self._state = TRANSITIONS[self._state][StartTls]
        self._events.append(StartTls())

    def _cmd_auth(self, arg: str) -> None:
        if not self.profile.offers_auth:
            raise ProtocolViolation(replies.AUTH_NOT_OFFERED)
        if self.profile.requires_tls_for_auth and not self.is_tls:
            raise ProtocolViolation(replies.STARTTLS_REQUIRED)  # RFC 6409 §4.3, RFC 3207
        if self.login is not None:
            raise ProtocolViolation(replies.ALREADY_AUTHENTICATED)  # RFC 4954 §4
        self._require(Auth)  # not in a transaction, not before EHLO
        words = arg.split(" ")
        if not words[0] or len(words) > 2:
            raise ProtocolViolation(replies.BAD_ARGUMENTS)
        mechanism = words[0].upper()
        if mechanism not in self.mechanisms:
            raise ProtocolViolation(replies.AUTH_NOT_SUPPORTED)
        initial = words[1] if len(words) == 2 else None
        self._sasl_mechanism = mechanism
        self._sasl_username = None
        if initial is None:
            self._state = State.SASL
            self._out += _LOGIN_USERNAME if mechanism == "LOGIN" else _SASL_CONTINUE
            return
        # RFC 4954 §4: "=" is an initial response of zero length
        self._sasl_response(b"" if initial == "=" else initial.encode("utf-8", "surrogateescape"))

    def _sasl_response(self, content: bytes) -> None:
        """One client response of the SASL exchange (or the AUTH initial response)."""
        if content == b"*":
            raise ProtocolViolation(replies.AUTH_CANCELLED)  # RFC 4954 §4
        if self._sasl_failure is not None:
            # The answer to a bearer-token error challenge: the dummy response (RFC 7628
            # §3.2.3) or not, the exchange has failed and its content is never decoded.
            failure = self._sasl_failure
            self._end_sasl()
            self._refuse(failure)
            return
        text = content.decode("ascii", "replace")
        if self._sasl_mechanism == "PLAIN":
            login, password = parse.parse_sasl_plain(text)
        elif self._sasl_mechanism == "OAUTHBEARER":
            login, password = parse.parse_oauthbearer(text)
        elif self._sasl_mechanism == "XOAUTH2":
            login, password = parse.parse_xoauth2(text)
        elif self._sasl_username is None:
            self._sasl_username = parse.decode_sasl_text(parse.decode_base64(text))
            self._state = State.SASL
            self._out += _LOGIN_PASSWORD
            return
        else:
            login = self._sasl_username
            password = parse.decode_sasl_text(parse.decode_base64(text))
        mechanism = self._sasl_mechanism
        self._end_sasl()
        self._events.append(Auth(mechanism=mechanism, login=login, password=password))

    def _end_sasl(self) -> None:
        if self._state is State.SASL:
            self._state = State.GREETED
        self._sasl_mechanism = ""
        self._sasl_username = None
        self._sasl_failure = None

    def _cmd_mail(self, arg: str) -> None:
        self._require(MailFrom)
        if self.profile.requires_auth and self.login is None:
            if self.profile.requires_tls_for_auth and not self.is_tls:
                raise ProtocolViolation(replies.STARTTLS_REQUIRED)  # RFC 3207 §4, RFC 6409
            raise ProtocolViolation(replies.AUTH_REQUIRED)  # RFC 4954 §6
        event = parse.parse_mail_args(arg, requiretls=self._may_requiretls())
        if event.size is not None and event.size > self.max_message_size:
            raise ProtocolViolation(replies.MESSAGE_TOO_BIG)  # RFC 1870 §6
        self._events.append(event)

    def _cmd_rcpt(self, arg: str) -> None:
        self._require(RcptTo)
        assert self._mail is not None
        if self._rcpt_accepted >= self.max_recipients:
            raise ProtocolViolation(replies.TOO_MANY_RECIPIENTS)  # RFC 5321 §4.5.3.1.10
        try:
            event = parse.parse_rcpt_args(arg, smtputf8=self._mail.smtputf8)
        except ProtocolViolation:
            self._rcpt_refused += 1  # counts for "554 no valid recipients" at DATA
            raise
        self._events.append(event)

    def _cmd_data(self, arg: str) -> None:
        if arg:
            raise ProtocolViolation(replies.BAD_ARGUMENTS)
        if self._state is State.MAIL and self._rcpt_refused:
            raise ProtocolViolation(replies.NO_VALID_RECIPIENTS)  # RFC 5321 §3.3
        self._require(DataStart)
        self._events.append(DataStart())

    def _cmd_rset(self, arg: str) -> None:
        if arg:
            raise ProtocolViolation(replies.BAD_ARGUMENTS)
        self._clear_transaction()
        self._state = TRANSITIONS[self._state][Reset]
        self._out += replies.RESET_OK.to_bytes()
        self._events.append(Reset())

    def _cmd_quit(self, arg: str) -> None:
        if arg:
            raise ProtocolViolation(replies.BAD_ARGUMENTS)
        self._out += replies.BYE.to_bytes()
        self._clear_transaction()
        self._state = TRANSITIONS[self._state][Quit]
        self._events.append(Quit())

    def _cmd_noop(self, arg: str) -> None:
        self._out += replies.NOOP_OK.to_bytes()  # RFC 5321 §4.1.1.9: arguments are ignored

    def _cmd_help(self, arg: str) -> None:
        self._out += replies.HELP_INFO.to_bytes()

    def _cmd_vrfy(self, arg: str) -> None:
        if not arg.strip():
            raise ProtocolViolation(replies.BAD_ARGUMENTS)
        self._out += replies.VRFY_DISABLED.to_bytes()  # RFC 5321 §3.5.3: no address harvesting

    def _cmd_expn(self, arg: str) -> None:
        raise ProtocolViolation(replies.NOT_IMPLEMENTED)  # RFC 5321 §3.5.2: may be disabled

    # --- helpers -------------------------------------------------------------------------------
    def _require(self, event_type: type[Event]) -> None:
        """Sequencing (RFC 5321 §4.1.4): the event must be possible in this state."""
        if event_type not in TRANSITIONS[self._state]:
            raise ProtocolViolation(replies.BAD_SEQUENCE)

    def _refuse(self, reply: Reply) -> None:
        self._out += reply.to_bytes()
        if reply.code >= 500:
            self._count_error()

    def _count_error(self) -> None:
        self.error_count += 1
        if self.error_count >= self.max_errors and self._state is not State.CLOSED:
            self._close("too many errors", replies.TOO_MANY_ERRORS)

    def _close(self, reason: str, reply: Reply | None) -> None:
        if reply is not None:
            self._out += reply.to_bytes()
        self._clear_transaction()
        self._in.clear()
        self._events.clear()
        self._state = State.CLOSED
        self._events.append(Close(reason=reason, reply_sent=reply is not None))

    def _clear_transaction(self) -> None:
        self._mail = None
        self._rcpt_accepted = self._rcpt_refused = 0
        self._reader = None


# Module level, not in the class body: mypyc (the optional compiled build) cannot refer to
# methods while the class is being defined.
_COMMANDS: Final[dict[str, Callable[[ServerConnection, str], None]]] = {
    "EHLO": ServerConnection._cmd_ehlo,
    "HELO": ServerConnection._cmd_helo,
    "STARTTLS": ServerConnection._cmd_starttls,
    "AUTH": ServerConnection._cmd_auth,
    "MAIL": ServerConnection._cmd_mail,
    "RCPT": ServerConnection._cmd_rcpt,
    "DATA": ServerConnection._cmd_data,
    "RSET": ServerConnection._cmd_rset,
    "QUIT": ServerConnection._cmd_quit,
    "NOOP": ServerConnection._cmd_noop,
    "HELP": ServerConnection._cmd_help,
    "VRFY": ServerConnection._cmd_vrfy,
    "EXPN": ServerConnection._cmd_expn,
}


def _is_positive(event: Event, reply: Reply) -> bool:
    """Whether `reply` accepts `event`; a reply class that makes no sense is a caller bug."""
    positive_class = _POSITIVE_CLASS[type(event)]
    reply_class = reply.code // 100
    if not 200 <= reply.code <= 599 or (reply_class in (2, 3) and reply_class != positive_class):
        raise UsageError(f"{reply.line()!r} cannot answer {type(event).__name__}")
    return reply_class == positive_class

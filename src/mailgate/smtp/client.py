"""The SMTP client as a sans-IO state machine: commands in, bytes out; bytes in, replies out.

Nothing here performs I/O, reads the clock, or decides what a reply means for delivery.

Owns: reading server replies (multi-line, bounded), the EHLO capability list, sequencing of
EHLO (with the HELO fallback), STARTTLS, the mail transaction (RSET when needed, MAIL, RCPT*,
DATA, the message text) and QUIT; pipelining the transaction when the server offers it; the
wire form of the message text (strict CRLF, dot-stuffed). Must not: open sockets, use asyncio
or TLS objects, keep time (timeouts are the adapter's, deliver/attempt.py), or turn replies
into delivery outcomes (also the adapter's).

Use::

    conn = ClientConnection()                 # expects the greeting
    conn.receive_data(chunk)                  # b"" means the server closed
    while (event := conn.next_event()) is not NEED_DATA:
        match event:
            case Greeting(reply=r) if r.is_positive: conn.ehlo("mail.example.org")
            case TransactionDone(): ...
    transport.write(conn.data_to_send())      # after every call that may queue output

Rules of the API (a violation raises `UsageError`, a bug in the caller):
- `ehlo()`, `starttls()`, `send_transaction()` and `quit()` are allowed only in the states of
  COMMANDS, that is when no command of ours is waiting for its reply.
- After a positive `StartTlsReply` the adapter upgrades the transport and calls
  `tls_started()`; only `ehlo()` (or `quit()`) may follow (RFC 3207 §4.2).
- `abort(reason)` says the adapter gave up on the connection (timeout, transport error).
- After `ConnectionClosed` or `QuitReply` the machine is closed: input is ignored and every
  command raises.

Events (in the order the replies arrived): `Greeting`, `EhloReply`, `StartTlsReply`,
`TransactionDone` (one per `send_transaction()`, also when the connection ended in the middle:
the replies that never came are None), `QuitReply`, `ConnectionClosed`.

Decisions (RFC references where the rule is enforced in the code):
- RFC 2920 PIPELINING: when offered, RSET (if needed), MAIL, every RCPT and DATA go in one
  write; the message text follows the 354 at once. Without it, one command per round trip.
  The machine follows the replies itself: without pipelining it stops after a refused MAIL and
  sends no DATA when every RCPT was refused; with pipelining a 354 that comes although no
  recipient was accepted gets a lone "." (RFC 2920 §3.1).
- RSET is sent only when a transaction ended with the server still in it (MAIL accepted, no
  reply to the final dot), and then lazily, in front of the next MAIL (in the same write when
  pipelining). A refused RSET closes the connection: the replies that follow it could belong to
  a transaction that we do not know about.
- Replies (RFC 5321 §4.2): three digits whose first is 2-5, then "-" (more lines follow),
  " " or the end of the line; every line of a multi-line reply has the same code. A line may end
  in CRLF or a bare LF (being lenient when reading replies cannot make two parties disagree
  about a message). Control characters in the text become spaces, invalid UTF-8 U+FFFD: reply
  text ends up in logs and DSNs.
- A reply of the wrong positive class (a 2xx to DATA, a 354 to RCPT) is a protocol violation,
  never taken as success; so is a reply when no command is waiting, except 421 (RFC 5321 §3.8:
  the server may announce that it is closing at any time).
- Bounded memory: a reply line is at most MAX_REPLY_LINE octets (RFC 5321 §4.5.3.1.5 allows
  512; real servers go beyond), a reply at most MAX_REPLY_LINES lines and MAX_REPLY_SIZE
  octets; replies only arrive
  for commands sent, so a hostile server cannot make the machine hold more than one partial
  reply plus the replies it owes.
- RFC 3207 §5 (the other direction of CVE-2011-0411): any byte received after the 220 to
  STARTTLS and before `tls_started()` was sent in plaintext and could be an injected reply: the
  connection is closed. After TLS the capabilities are forgotten until the next EHLO.
- The message text goes out as strict CRLF: a bare CR or LF in the stored bytes becomes CRLF,
  so that we are never the first hop of an SMTP smuggling chain (RFC 5321 §2.3.8), and every
  line starting with "." gets another one (RFC 5321 §4.5.2).
- Command lines never carry a control character (NUL, CR, LF ...): addresses and parameters
  that would inject one raise `UsageError`, as the adapter must have refused them before.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from mailgate.errors import UsageError
from mailgate.replies import Reply
from mailgate.smtp.data import DataEncoder

MAX_REPLY_LINE: Final = 4096  # octets per reply line, CRLF included (RFC 5321 says 512)
MAX_REPLY_LINES: Final = 100  # lines per multi-line reply (an EHLO reply has about 15)
MAX_REPLY_SIZE: Final = 65536  # octets of text per multi-line reply

_ENHANCED: Final = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})")
_CONTROL: Final = re.compile(rb"[\x00-\x1f\x7f]")
_CONTROL_TEXT: Final = re.compile(r"[\x00-\x1f\x7f]")
# What may not appear inside <...> of a command: controls, space, brackets (RFC 5321 §4.1.2).
_UNSAFE_PATH: Final = re.compile(r"[\x00-\x20<>\x7f]")
_UNSAFE_PARAM: Final = re.compile(r"[\x00-\x20\x7f]")


class _NeedData(enum.Enum):
    """The type of NEED_DATA: nothing to return until more bytes arrive. A one-member enum, so
    that `event is not NEED_DATA` narrows the type for mypy."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData.NEED_DATA


# --- replies and events ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerReply:
    """One complete reply of the server.

    code:  the three-digit reply code.
    lines: the text of every line without code and separator, decoded, controls blanked.
    """

    code: int
    lines: tuple[str, ...]

    @property
    def is_positive(self) -> bool:
        """2xx or 3xx (RFC 5321 §4.2.1); whether it is the *expected* positive reply is the
        machine's business."""
        return 200 <= self.code < 400

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def to_reply(self) -> Reply:
        return to_reply(self.code, self.lines)


def to_reply(code: int, lines: Sequence[str]) -> Reply:
    """A server reply as a Reply: the enhanced status code if the server gave one on its first
    line (RFC 2034 §4) and of the same class as the code, else the class of the code ("X.0.0",
    4.0.0 for anything that is neither 2, 4 nor 5). The text is every line, joined by spaces."""
    text = " ".join(part.strip() for part in lines if part.strip())
    first, _, rest = text.partition(" ")
    klass = str(code)[0]
    if _ENHANCED.fullmatch(first) and first[0] == klass:
        return Reply(code, first, rest)
    return Reply(code, f"{klass if klass in '245' else '4'}.0.0", text)


@dataclass(frozen=True, slots=True)
class Greeting:
    """The server's opening reply (RFC 5321 §4.3.1). Not 2xx: only `quit()` may follow."""

    reply: ServerReply


@dataclass(frozen=True, slots=True)
class EhloReply:
    """The answer to `ehlo()`.

    reply:        the EHLO reply, or the HELO reply when EHLO was not known (is_extended False).
    capabilities: extension keyword (upper case) -> its parameters ("SIZE" -> "10240000");
                  empty after HELO or a refusal.
    is_extended:  EHLO was accepted or refused as such; False when the machine fell back to
                  HELO (RFC 5321 §4.1.1.1: the server answered 500 or 502 to EHLO).
    """

    reply: ServerReply
    capabilities: Mapping[str, str]
    is_extended: bool


@dataclass(frozen=True, slots=True)
class StartTlsReply:
    """The answer to `starttls()`. Positive: upgrade now, then `tls_started()`. Negative: the
    session goes on in plaintext (RFC 3207 §4)."""

    reply: ServerReply


@dataclass(frozen=True, slots=True)
class TransactionDone:
    """The replies of one `send_transaction()`. A reply that never came (the connection ended
    first, or the command was not sent) is None.

    mail:    the reply to MAIL FROM.
    rcpts:   one per recipient given, in order: the reply to its RCPT TO.
    data:    the reply to DATA (354, or a refusal). None when DATA was not sent: without
             pipelining, after a refused MAIL or when every RCPT was refused.
    message: the reply to the final dot of the message text; None when the text was not sent.
    """

    mail: ServerReply | None
    rcpts: tuple[ServerReply | None, ...]
    data: ServerReply | None
    message: ServerReply | None


@dataclass(frozen=True, slots=True)
class QuitReply:
    """The answer to `quit()`; the machine is closed."""

    reply: ServerReply


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The connection is over and the machine closed: the server closed it or broke the
    protocol, or the adapter called `abort()`. reason: one line for the log."""

    reason: str


@dataclass(frozen=True, slots=True)
class TextWanted:
    """The server answered 354 to a transaction whose text is streamed (`send_transaction()`
    without a message): give it with `send_text()`, then `end_text()`."""


ClientEvent = (
    Greeting | EhloReply | StartTlsReply | TextWanted | TransactionDone | QuitReply
    | ConnectionClosed
)  # fmt: skip


# --- states ------------------------------------------------------------------------------------


class State(enum.Enum):
    """Where the session is. Waiting states end with the reply to our command."""

    GREETING = "greeting"  # waiting for the server's greeting
    REFUSED = "refused"  # the greeting was not 2xx: only QUIT (RFC 5321 §3.1)
    CONNECTED = "connected"  # greeted (or TLS just started): EHLO next
    EHLO = "ehlo"  # EHLO (or the HELO fallback) sent
    READY = "ready"  # EHLO accepted: a transaction, STARTTLS or QUIT
    STARTTLS = "starttls"  # STARTTLS sent
    TLS_PENDING = "tls-pending"  # 220 to STARTTLS: waiting for tls_started()
    TRANSACTION = "transaction"  # a transaction's commands are in flight
    QUIT = "quit"  # QUIT sent
    CLOSED = "closed"

    # Looked up in COMMANDS and _AFTER_REPLY several times per transaction: hash by identity
    # (members are singletons and compare by identity) in C, not Enum's Python-level hash.
    __hash__ = object.__hash__


class Command(enum.Enum):
    """What the adapter asks for."""

    EHLO = "ehlo"
    STARTTLS = "starttls"
    TRANSACTION = "transaction"
    QUIT = "quit"

    __hash__ = object.__hash__  # as State's


# In a state (outer key), a command (inner key) may be given and moves the machine to the inner
# value. Every other call raises UsageError. Replies then move waiting states on (see
# _AFTER_REPLY); tls_started() moves TLS_PENDING to CONNECTED.
COMMANDS: Final[dict[State, dict[Command, State]]] = {
    State.GREETING: {},
    State.REFUSED: {Command.QUIT: State.QUIT},
    State.CONNECTED: {Command.EHLO: State.EHLO, Command.QUIT: State.QUIT},
    State.EHLO: {},
    State.READY: {
        Command.EHLO: State.EHLO,
        Command.STARTTLS: State.STARTTLS,
        Command.TRANSACTION: State.TRANSACTION,
        Command.QUIT: State.QUIT,
    },
    State.STARTTLS: {},
    State.TLS_PENDING: {},
    State.TRANSACTION: {},
    State.QUIT: {},
    State.CLOSED: {},
}

# A waiting state -> (the state after a positive reply, the state after a negative one).
_AFTER_REPLY: Final[dict[State, tuple[State, State]]] = {
    State.GREETING: (State.CONNECTED, State.REFUSED),
    State.EHLO: (State.READY, State.CONNECTED),
    State.STARTTLS: (State.TLS_PENDING, State.READY),
    State.QUIT: (State.CLOSED, State.CLOSED),
}


class _Step(enum.Enum):
    """A command whose reply is awaited."""

    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    RSET = "RSET"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    MESSAGE = "end of data"
    QUIT = "QUIT"

    __hash__ = object.__hash__  # as State's


# The reply class that counts as positive for each step; a reply of the other positive class
# (a 2xx to DATA, a 354 to RCPT) is a protocol violation, never a success.
_POSITIVE_CLASS: Final[dict[_Step, int]] = {step: 2 for step in _Step} | {_Step.DATA: 3}


class _Transaction:
    """The transaction in flight: what is left to send and the replies so far."""

    __slots__ = ("clean_from", "data", "encoder", "is_pipelined", "mail", "mail_line",
                 "message", "message_text", "next_rcpt", "rcpt_lines", "rcpts",
                 "sent_text")  # fmt: skip

    def __init__(
        self,
        mail_line: bytes,
        rcpt_lines: list[bytes],
        message_text: bytes | None,
        is_pipelined: bool,
        clean_from: int | None = None,
    ) -> None:
        self.mail_line = mail_line
        self.rcpt_lines = rcpt_lines
        self.message_text = message_text
        self.clean_from = clean_from  # see DataEncoder
        self.is_pipelined = is_pipelined
        self.mail: ServerReply | None = None
        self.rcpts: list[ServerReply | None] = [None] * len(rcpt_lines)
        self.next_rcpt = 0  # index of the next RCPT reply
        self.data: ServerReply | None = None
        self.message: ServerReply | None = None
        self.sent_text = False  # the message text (not a lone dot) went out
        self.encoder: DataEncoder | None = None  # streamed text: between 354 and end_text()

    @property
    def has_recipient(self) -> bool:
        """MAIL and at least one RCPT were accepted: the message text may go."""
        return _is_2xx(self.mail) and any(_is_2xx(r) for r in self.rcpts)

    def done(self) -> TransactionDone:
        return TransactionDone(self.mail, tuple(self.rcpts), self.data, self.message)


# --- the machine ---------------------------------------------------------------------------------


class ClientConnection:
    """One SMTP client session without I/O.

    Public attributes (read them, do not assign): state, is_tls, capabilities, is_closed,
    is_pipelining.
    """

    def __init__(self) -> None:
        self._state = State.GREETING
        self.is_tls = False
        self.capabilities: Mapping[str, str] = {}
        self._in = b""  # an unfinished reply line
        self._out: list[bytes] = []
        self._events: deque[ClientEvent] = deque()
        self._expect: deque[_Step] = deque([_Step.GREETING])
        self._reply_code = 0  # of the multi-line reply being read, 0 between replies
        self._reply_lines: list[str] = []
        self._reply_size = 0
        self._helo_name = ""
        self._txn: _Transaction | None = None
        self._needs_reset = False  # the server may still be inside a transaction
        self._plaintext_after_starttls = False

    # --- public properties ------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def is_closed(self) -> bool:
        return self._state is State.CLOSED

    @property
    def is_pipelining(self) -> bool:
        """The server offered PIPELINING in its last EHLO reply (RFC 2920 §3)."""
        return "PIPELINING" in self.capabilities

    @property
    def has_events(self) -> bool:
        """next_event() would return an event (lets an adapter skip waking its reader)."""
        return bool(self._events)

    @property
    def _is_awaiting_tls(self) -> bool:
        return self._state is State.TLS_PENDING

    def supports(self, extension: str) -> bool:
        return extension.upper() in self.capabilities

    def may(self, command: Command) -> bool:
        """Whether `command` may be given now (COMMANDS)."""
        return command in COMMANDS[self._state]

    # --- input ------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Bytes from the server; b"" means the server closed its side."""
        if self._state is State.CLOSED:
            return
        if not data:
            self._close("connection closed by the server")
            return
        if self._state is State.TLS_PENDING:
            # RFC 3207 §5: nothing received before the TLS handshake may be acted upon.
            self._plaintext_after_starttls = True
            return
        buf = self._in + data if self._in else data
        start = 0
        for _ in range(len(buf)):  # bounded: every pass consumes one line
            lf = buf.find(b"\n", start)
            if lf < 0:
                break
            end = lf - 1 if lf > start and buf[lf - 1] == 0x0D else lf  # CRLF or a bare LF
            if lf + 1 - start > MAX_REPLY_LINE:
                self._close("reply line too long")
                return
            self._reply_line(buf[start:end])
            start = lf + 1
            if self.is_closed:
                return
            if self._is_awaiting_tls and start < len(buf):
                self._close("data after the reply to STARTTLS")  # RFC 3207 §5
                return
        self._in = buf[start:] if start else buf
        if len(self._in) >= MAX_REPLY_LINE:
            self._close("reply line too long")

    def next_event(self) -> ClientEvent | _NeedData:
        """The next event, or NEED_DATA."""
        return self._events.popleft() if self._events else NEED_DATA

    def data_to_send(self) -> bytes:
        """The bytes to write to the server; empties the outgoing buffer."""
        out = b"".join(self._out)  # a single chunk is returned as is, without a copy
        self._out.clear()
        return out

    # --- commands ---------------------------------------------------------------------------
    def ehlo(self, name: str) -> None:
        """EHLO name; on 500/502 the machine retries with HELO (RFC 5321 §4.1.1.1)."""
        self._command(Command.EHLO)
        self._helo_name = name
        self.capabilities = {}
        self._send(_command_line(b"EHLO", name), _Step.EHLO)

    def starttls(self) -> None:
        """STARTTLS (RFC 3207 §4); only when offered and not yet under TLS."""
        if self.is_tls or not self.supports("STARTTLS"):
            raise UsageError("starttls() when STARTTLS is not offered")
        self._command(Command.STARTTLS)
        self._send(b"STARTTLS\r\n", _Step.STARTTLS)

    def tls_started(self) -> None:
        """The adapter upgraded the transport after a positive StartTlsReply. RFC 3207 §4.2:
        forget the capabilities; EHLO comes next."""
        if self._state is not State.TLS_PENDING:
            raise UsageError(f"tls_started() in state {self._state.name}")
        self.is_tls = True
        self.capabilities = {}
        if self._plaintext_after_starttls:
            self._close("data after the reply to STARTTLS")
        else:
            self._state = State.CONNECTED

    def send_transaction(
        self,
        mail_from: str,
        params: Sequence[str],
        rcpts: Sequence[tuple[str, Sequence[str]]],
        message: bytes | None,
        *,
        clean_from: int | None = None,
    ) -> None:
        """One mail transaction: MAIL FROM:<mail_from> params, RCPT TO:<addr> params for each
        recipient, DATA and the message text (stored form: any line ends; it is normalised
        and dot-stuffed here). Ends with one TransactionDone.

        `message` None streams the text: after the 354 the machine yields `TextWanted`, and
        the adapter gives the text in chunks with `send_text()` and ends it with `end_text()`
        (a 50 MB message never has to be in memory). `clean_from`: from this offset on the
        text is known to have CR and LF only as CRLF, and is only dot-stuffed (DataEncoder)."""
        if not rcpts:
            raise UsageError("send_transaction() without recipients")
        try:
            mail_line = _command_line(b"MAIL FROM:", f"<{_path(mail_from)}>", params)
            rcpt_lines = [_command_line(b"RCPT TO:", f"<{_path(a)}>", p) for a, p in rcpts]
        except UnicodeEncodeError:
            raise UsageError("an address or parameter cannot be encoded") from None
        self._command(Command.TRANSACTION)
        txn = _Transaction(mail_line, rcpt_lines, message, self.is_pipelining, clean_from)
        self._txn = txn
        if self._needs_reset:
            self._send(b"RSET\r\n", _Step.RSET)
            if not txn.is_pipelined:
                return  # MAIL follows the reply to RSET
        self._send(mail_line, _Step.MAIL)
        if txn.is_pipelined:
            # RFC 2920 §3.1: the whole group in one write; DATA is its last command.
            for rcpt_line in rcpt_lines:
                self._send(rcpt_line, _Step.RCPT)
            self._send(b"DATA\r\n", _Step.DATA)

    @property
    def is_sending_text(self) -> bool:
        """A streamed transaction's text is wanted: `send_text()`/`end_text()` may be called."""
        return self._txn is not None and self._txn.encoder is not None

    def send_text(self, data: bytes) -> None:
        """The next chunk of a streamed message text (stored form, cut anywhere: a CRLF or a
        line's leading dot split between chunks is handled). Ignored once the connection is
        closed (the transaction's outcome is then already in TransactionDone)."""
        if self.is_closed:
            return
        encoder = self._text_encoder("send_text")
        out = encoder.feed(data)
        if out:
            self._out.append(out)

    def end_text(self) -> None:
        """The streamed text is complete: its end (and the final dot) go out."""
        if self.is_closed:
            return
        encoder = self._text_encoder("end_text")
        assert self._txn is not None
        self._txn.encoder = None
        self._send(encoder.finish(), _Step.MESSAGE)

    def _text_encoder(self, name: str) -> DataEncoder:
        txn = self._txn
        if txn is None or txn.encoder is None:
            raise UsageError(f"{name}() when no streamed message text is wanted")
        return txn.encoder

    def quit(self) -> None:
        """QUIT (RFC 5321 §4.1.1.10)."""
        self._command(Command.QUIT)
        self._send(b"QUIT\r\n", _Step.QUIT)

    def abort(self, reason: str) -> None:
        """The adapter gave up on the connection (timeout, transport error): close, and yield
        what is known of the transaction in flight."""
        self._close(reason)

    # --- replies ----------------------------------------------------------------------------
    def _reply_line(self, line: bytes) -> None:
        """One reply line without its line end (RFC 5321 §4.2)."""
        code_bytes, separator = line[:3], line[3:4]
        if (
            len(code_bytes) != 3
            or not code_bytes.isdigit()
            or code_bytes[0] not in b"2345"
            or separator not in (b"", b" ", b"-")
        ):
            self._close("malformed reply line")
            return
        code = int(code_bytes)
        if self._reply_code and code != self._reply_code:
            self._close("reply code changed inside a multi-line reply")  # RFC 5321 §4.2.1
            return
        raw = line[4:]
        self._reply_size += len(raw)
        if len(self._reply_lines) >= MAX_REPLY_LINES or self._reply_size > MAX_REPLY_SIZE:
            self._close("reply too long")
            return
        if _CONTROL.search(raw):
            raw = _CONTROL.sub(b" ", raw)
        self._reply_code = code
        self._reply_lines.append(raw.decode("utf-8", "replace"))
        if separator == b"-":
            return
        reply = ServerReply(code, tuple(self._reply_lines))
        self._reply_code = self._reply_size = 0
        self._reply_lines = []
        self._reply(reply)

    def _reply(self, reply: ServerReply) -> None:
        if not self._expect:
            if reply.code == 421:
                # RFC 5321 §3.8: a server that shuts down may say so at any time.
                self._close(f"server closing: {reply.to_reply().line()}")
            else:
                self._close("reply without a command")
            return
        step = self._expect.popleft()
        reply_class = reply.code // 100
        positive_class = _POSITIVE_CLASS[step]
        if reply_class in (2, 3) and reply_class != positive_class:
            self._close(f"unexpected reply to {step.value}: {reply.code}")
            return
        positive = reply_class == positive_class
        match step:
            case _Step.EHLO if reply.code in (500, 502):
                # RFC 5321 §4.1.1.1: a server that does not know EHLO gets HELO.
                self._send(_command_line(b"HELO", self._helo_name), _Step.HELO)
            case _Step.EHLO | _Step.HELO:
                is_extended = step is _Step.EHLO
                if positive and is_extended:
                    self.capabilities = _capabilities(reply.lines[1:])
                self._after_reply(positive)
                self._events.append(EhloReply(reply, self.capabilities, is_extended))
            case _Step.GREETING:
                self._after_reply(positive)
                self._events.append(Greeting(reply))
            case _Step.STARTTLS:
                self._after_reply(positive)
                self._events.append(StartTlsReply(reply))
            case _Step.QUIT:
                self._after_reply(positive)
                self._events.append(QuitReply(reply))
            case _:
                self._transaction_reply(step, reply, positive)

    def _transaction_reply(self, step: _Step, reply: ServerReply, positive: bool) -> None:
        txn = self._txn
        assert txn is not None  # only send_transaction() queues these steps
        match step:
            case _Step.RSET:
                if not positive:
                    self._close(f"RSET refused: {reply.to_reply().line()}")
                    return
                self._needs_reset = False
                if not txn.is_pipelined:
                    self._send(txn.mail_line, _Step.MAIL)
            case _Step.MAIL:
                txn.mail = reply
                if not txn.is_pipelined:
                    if not positive:
                        self._finish()  # the server is not in a transaction
                        return
                    self._send(txn.rcpt_lines[0], _Step.RCPT)
            case _Step.RCPT:
                txn.rcpts[txn.next_rcpt] = reply
                txn.next_rcpt += 1
                if not txn.is_pipelined:
                    if txn.next_rcpt < len(txn.rcpt_lines):
                        self._send(txn.rcpt_lines[txn.next_rcpt], _Step.RCPT)
                    elif txn.has_recipient:
                        self._send(b"DATA\r\n", _Step.DATA)
                    else:
                        self._needs_reset = True  # MAIL was accepted
                        self._finish()
            case _Step.DATA:
                txn.data = reply
                if not positive:
                    self._needs_reset = _is_2xx(txn.mail)
                    self._finish()
                elif txn.has_recipient:
                    txn.sent_text = True
                    if txn.message_text is None:
                        txn.encoder = DataEncoder(txn.clean_from)
                        self._events.append(TextWanted())
                    else:
                        text = encode_message(txn.message_text, txn.clean_from)
                        self._send(text, _Step.MESSAGE)
                else:
                    # RFC 2920 §3.1: DATA accepted although no recipient was: an empty message
                    # ends it, and its reply means nothing.
                    self._send(b".\r\n", _Step.MESSAGE)
            case _Step.MESSAGE:
                if txn.sent_text:
                    txn.message = reply
                # RFC 5321 §4.1.1.4: whatever the reply to the final dot, the transaction is over.
                self._needs_reset = False
                self._finish()
            case _:
                raise AssertionError(f"{step} in a transaction")

    def _finish(self) -> None:
        """The transaction is over; more replies are owed only if pipelined commands were
        refused after a refused MAIL, and none are by then."""
        txn = self._txn
        assert txn is not None
        self._txn = None
        self._state = State.READY
        self._events.append(txn.done())

    # --- helpers ----------------------------------------------------------------------------
    def _command(self, command: Command) -> None:
        """Sequencing of our own commands: a call in the wrong state is a bug."""
        to = COMMANDS[self._state].get(command)
        if to is None:
            raise UsageError(f"{command.name} in state {self._state.name}")
        self._state = to

    def _send(self, data: bytes, step: _Step) -> None:
        self._out.append(data)
        self._expect.append(step)

    def _after_reply(self, positive: bool) -> None:
        on_positive, on_negative = _AFTER_REPLY[self._state]
        self._state = on_positive if positive else on_negative

    def _close(self, reason: str) -> None:
        if self._state is State.CLOSED:
            return
        txn = self._txn
        self._txn = None
        self._state = State.CLOSED
        self._in = b""
        self._out.clear()
        self._expect.clear()
        if txn is not None:
            self._events.append(txn.done())
        self._events.append(ConnectionClosed(reason))


def encode_message(message: bytes, clean_from: int | None = None) -> bytes:
    """The stored message as DATA text: bare CR and bare LF become CRLF (RFC 5321 §2.3.8;
    before `clean_from`, see DataEncoder), the last line ends in CRLF, lines starting with "."
    get another (§4.5.2), and the final ".\\r\\n" follows."""
    encoder = DataEncoder(clean_from)
    return encoder.feed(message) + encoder.finish()


def _capabilities(lines: Sequence[str]) -> dict[str, str]:
    """EHLO lines after the first: "KEYWORD params" (RFC 5321 §4.1.1.1, RFC 1869 §4.3)."""
    found: dict[str, str] = {}
    for line in lines:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            found[keyword.upper()] = params.strip()
    return found


def _path(address: str) -> str:
    if _UNSAFE_PATH.search(address):
        raise UsageError(f"address {address!r} cannot go on a command line")
    return address


def _command_line(verb: bytes, argument: str, params: Sequence[str] = ()) -> bytes:
    """One command line. Non-ASCII only in addresses, which the adapter allows only with
    SMTPUTF8 (RFC 6531 §3.3); no control character anywhere (command injection)."""
    if _CONTROL_TEXT.search(argument):
        raise UsageError("control character in a command argument")
    for param in params:
        if not param or _UNSAFE_PARAM.search(param):
            raise UsageError(f"ESMTP parameter {param!r} cannot go on a command line")
    sep = b"" if verb.endswith(b":") else b" "
    return verb + sep + " ".join([argument, *params]).encode("utf-8") + b"\r\n"


def _is_2xx(reply: ServerReply | None) -> bool:
    return reply is not None and 200 <= reply.code < 300

"""Scripted SMTP dialogues: parse a transcript, play it against the sans-IO machine.

Owns: the transcript format (below), reply matching (`match_reply`) and the machine player with
its fixed fake adapter. The same `.txt` files are meant to be replayed against the live server
by the e2e suite, so parsing and matching are kept free of anything machine-specific.
Must not: open sockets or start processes (the live player lives with the e2e tests).

Transcript format (STYLE.md §9), one directive per line:

    # comment (the comments before the first directive describe the dialogue)
    service submission          which service (events.PROFILES); required, before any step
    option max_errors 3         a ServerConnection limit: max_message_size, max_recipients,
                                max_errors (a live replay must configure the same or skip)
    C: EHLO client.test         the client sends this line followed by CRLF
    B: MAIL FROM:<a@b>\\n        the client sends these bytes as they are, no CRLF added;
                                escapes \\r \\n \\t \\0 \\\\ \\xHH
    S: 250 2.0.0 *              the server sends one reply line matching the pattern; `*` is
                                any run of characters (possibly empty), everything else literal
    S: 250-*                    exactly "NNN-*": one or more continuation lines of reply NNN
                                (the middle of an EHLO reply, without listing each extension)
    S: 250-${hostname}          `${hostname}` matches the server's name (any run of non-space
                                characters), so transcripts do not depend on the configuration
    TLS                         the client starts TLS now (after reading 220 to STARTTLS)
    HANGUP                      the client closes its side of the connection
    CLOSED                      the server has closed the connection: no further reply

In C: and B: lines, `{{TEXT*N}}` stands for TEXT repeated N times (for over-long lines).
Adjacent C:/B: lines (no other line, not even a blank one, between them) are sent in one
write: that is how pipelining and "bytes after STARTTLS" are written. Every reply the server
sends must be matched by an S: line before the client writes again, and at the end. The 220
greeting may be matched by a first S: line; when the first step is not an S: line, the greeting
is read without being checked.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailgate import replies
from mailgate.replies import Reply
from mailgate.smtp.events import (
    PROFILES,
    Auth,
    DataStart,
    Ehlo,
    EndOfData,
    Event,
    MailFrom,
    RcptTo,
    StartTls,
)
from mailgate.smtp.server import NEED_DATA, ServerConnection

HERE = Path(__file__).resolve().parent
HOSTNAME = "mail.example.test"
DEFAULT_OPTIONS = {"max_message_size": 52428800, "max_recipients": 100, "max_errors": 10}
# The fake adapter's one account (AGFsaWNlAHNlY3JldA== is PLAIN for it).
FAKE_LOGIN, FAKE_PASSWORD = "alice", "secret"
FAKE_QUEUE_ID = "TESTQID"


# --- transcript model ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Send:
    """The client writes `data` in one write."""

    data: bytes
    line_no: int


@dataclass(frozen=True, slots=True)
class Expect:
    """The server sends one reply line matching `pattern` (see match_reply)."""

    pattern: str
    line_no: int


@dataclass(frozen=True, slots=True)
class StartTlsNow:
    """The client starts the TLS handshake now."""

    line_no: int


@dataclass(frozen=True, slots=True)
class Hangup:
    """The client closes its side of the connection."""

    line_no: int


@dataclass(frozen=True, slots=True)
class ExpectClosed:
    """The server has closed the connection and sends nothing more."""

    line_no: int


Step = Send | Expect | StartTlsNow | Hangup | ExpectClosed


@dataclass(frozen=True, slots=True)
class Transcript:
    service: str
    steps: tuple[Step, ...]
    options: dict[str, int] = field(default_factory=dict)
    description: str = ""
    name: str = ""


class TranscriptError(ValueError):
    """The transcript itself is malformed (names the line)."""


class DialogueMismatch(AssertionError):
    """The server did not say what the transcript expects."""


# --- parsing ---------------------------------------------------------------------------------
_REPEAT_RE = re.compile(r"\{\{(.*?)\*(\d+)\}\}")
_ESCAPE_RE = re.compile(r"\\(x[0-9A-Fa-f]{2}|[rnt0\\])")
_ESCAPES = {"r": b"\r", "n": b"\n", "t": b"\t", "0": b"\0", "\\": b"\\"}


def _expand(text: str) -> str:
    return _REPEAT_RE.sub(lambda m: m.group(1) * int(m.group(2)), text)


def _unescape(text: str, line_no: int) -> bytes:
    out = bytearray()
    pos = 0
    for m in _ESCAPE_RE.finditer(text):
        out += text[pos : m.start()].encode("utf-8")
        code = m.group(1)
        out += bytes([int(code[1:], 16)]) if code[0] == "x" else _ESCAPES[code]
        pos = m.end()
    rest = text[pos:]
    if "\\" in rest:
        raise TranscriptError(f"line {line_no}: unknown escape in {text!r}")
    out += rest.encode("utf-8")
    return bytes(out)


def parse_transcript(text: str, name: str = "") -> Transcript:
    """Parse the transcript format described in this module's docstring."""
    service = ""
    options: dict[str, int] = {}
    steps: list[Step] = []
    description: list[str] = []
    previous_was_send = False
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r")
        is_send = line.startswith(("C: ", "B: ")) or line in ("C:", "B:")
        if is_send:
            body = _expand(line[3:])
            data = body.encode("utf-8") + b"\r\n" if line[0] == "C" else _unescape(body, line_no)
            last = steps[-1] if steps else None
            if previous_was_send and isinstance(last, Send):
                steps[-1] = Send(last.data + data, last.line_no)
            else:
                steps.append(Send(data, line_no))
        elif not line.strip() or line.startswith("#"):
            if line.startswith("#") and not steps and not service:
                description.append(line[1:].strip())
        elif line.startswith("S: ") or line == "S:":
            steps.append(Expect(line[3:], line_no))
        elif line.split(" ")[0] == "service":
            words = line.split()
            if len(words) != 2 or words[1] not in PROFILES or service:
                raise TranscriptError(f"line {line_no}: bad service line {line!r}")
            service = words[1]
        elif line.split(" ")[0] == "option":
            words = line.split()
            if len(words) != 3 or words[1] not in DEFAULT_OPTIONS or not words[2].isdigit():
                raise TranscriptError(f"line {line_no}: bad option line {line!r}")
            options[words[1]] = int(words[2])
        elif line == "TLS":
            steps.append(StartTlsNow(line_no))
        elif line == "HANGUP":
            steps.append(Hangup(line_no))
        elif line == "CLOSED":
            steps.append(ExpectClosed(line_no))
        else:
            raise TranscriptError(f"line {line_no}: cannot parse {line!r}")
        previous_was_send = is_send
        if (steps or options) and not service:
            raise TranscriptError(f"line {line_no}: 'service' must come first")
    if not service:
        raise TranscriptError("no 'service' line")
    return Transcript(service, tuple(steps), options, " ".join(description), name)


def load_transcripts(directory: Path = HERE) -> Iterator[Transcript]:
    """Every *.txt transcript in `directory`, in name order."""
    for path in sorted(directory.glob("*.txt")):
        yield parse_transcript(path.read_text(encoding="utf-8"), name=path.stem)


def is_continuation_wildcard(pattern: str) -> bool:
    """Whether an S: pattern is the "NNN-*" form that matches one or more continuation lines."""
    return len(pattern) == 5 and pattern[:3].isdigit() and pattern[3:] == "-*"


def match_reply(pattern: str, line: str) -> bool:
    """Whether a reply line (without CRLF) matches an S: pattern: `*` matches any run of
    characters, including none; `${hostname}` any non-empty run of non-space characters;
    every other character matches itself."""
    regex = r"\S+".join(
        ".*".join(re.escape(part) for part in piece.split("*"))
        for piece in pattern.split("${hostname}")
    )
    return re.fullmatch(regex, line, flags=re.DOTALL) is not None


# --- the fake adapter --------------------------------------------------------------------------
def fake_answer(conn: ServerConnection, event: Event) -> None:
    """Answer `event` as a fixed, permissive session would (no policy, one account)."""
    reply: Reply | None
    match event:
        case Ehlo():
            reply = replies.OK
        case Auth(login=login, password=password):
            ok = (login, password) == (FAKE_LOGIN, FAKE_PASSWORD)
            reply = replies.AUTH_SUCCEEDED if ok else replies.BAD_CREDENTIALS
        case MailFrom():
            reply = replies.SENDER_OK
        case RcptTo():
            reply = replies.RECIPIENT_OK
        case DataStart():
            reply = replies.START_DATA
        case EndOfData(too_big=True):
            reply = replies.MESSAGE_TOO_BIG
        case EndOfData(bad_line=True):
            reply = replies.TEXT_LINE_TOO_LONG
        case EndOfData():
            reply = replies.queued(FAKE_QUEUE_ID)
        case StartTls():
            conn.tls_started()  # the transport upgrade, done at once
            reply = None
        case _:
            reply = None  # MessageChunk, Reset, Quit, Close need no answer
    if reply is not None:
        conn.send(reply)


def drive(conn: ServerConnection, data: bytes) -> list[Event]:
    """Feed `data` (b"" = hang up), answer every event with the fake; return the events."""
    conn.receive_data(data)
    events: list[Event] = []
    for _ in range(len(data) + 100):  # bounded: each event consumes input or ends the input
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        assert isinstance(event, Event)
        events.append(event)
        fake_answer(conn, event)
    raise AssertionError("the machine yields events without end")


def new_machine(transcript: Transcript) -> ServerConnection:
    options: dict[str, Any] = {**DEFAULT_OPTIONS, **transcript.options}
    return ServerConnection(PROFILES[transcript.service], HOSTNAME, **options)


# --- playing ------------------------------------------------------------------------------------
def _lines(data: bytes) -> list[str]:
    text = data.decode("utf-8", "replace")
    assert text == "" or text.endswith("\r\n"), f"reply without CRLF: {text!r}"
    return text.split("\r\n")[:-1]


def play_against_machine(transcript: Transcript) -> list[str]:
    """Play `transcript` against a ServerConnection answered by `fake_answer`.

    Returns the reply lines seen; raises DialogueMismatch naming the transcript line."""
    where = transcript.name or transcript.service
    conn = new_machine(transcript)
    conn.start()
    unread = _lines(conn.data_to_send())
    if not transcript.steps or not isinstance(transcript.steps[0], Expect):
        unread = []  # the greeting, not checked by this transcript
    seen: list[str] = []
    for step in transcript.steps:
        match step:
            case Send(line_no=n) | Hangup(line_no=n):
                if unread:
                    raise DialogueMismatch(f"{where}:{n}: unexpected reply {unread[0]!r}")
                drive(conn, step.data if isinstance(step, Send) else b"")
                unread = _lines(conn.data_to_send())
            case Expect(pattern=pattern, line_no=n):
                if not unread:
                    raise DialogueMismatch(f"{where}:{n}: expected {pattern!r}, got nothing")
                line = unread.pop(0)
                seen.append(line)
                if not match_reply(pattern, line):
                    raise DialogueMismatch(f"{where}:{n}: expected {pattern!r}, got {line!r}")
                if is_continuation_wildcard(pattern):
                    while unread and unread[0].startswith(pattern[:4]):
                        seen.append(unread.pop(0))
            case StartTlsNow(line_no=n):
                if not conn.is_tls or unread:
                    raise DialogueMismatch(f"{where}:{n}: TLS was not started by the server")
            case ExpectClosed(line_no=n):
                if unread:
                    raise DialogueMismatch(f"{where}:{n}: unexpected reply {unread[0]!r}")
                if not conn.is_closed:
                    raise DialogueMismatch(f"{where}:{n}: the server did not close")
    if unread:
        raise DialogueMismatch(f"{where}: end: unexpected reply {unread[0]!r}")
    return seen


def plain_response(login: str, password: str, authzid: str = "") -> str:
    """The base64 SASL PLAIN response, for writing transcripts and tests."""
    return base64.b64encode(f"{authzid}\0{login}\0{password}".encode()).decode("ascii")

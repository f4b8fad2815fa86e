"""The DATA reader: message text from the wire to message bytes, fast and strict.

Owns: finding the end of the message (only CRLF "." CRLF), dot-unstuffing, refusing bare CR,
bare LF and NUL, counting the size and noticing over-long text lines. Also the inverse,
`DataEncoder` (dot-stuffing in chunks, for the delivery client) and `encode_data` (tests).
Must not: know about events, replies or the session; perform I/O; loop per byte in Python
(this is the hot path: every step is a C-level bytes method over a whole received block).

RFCs:
- RFC 5321 §4.1.1.4: the mail data ends with CRLF "." CRLF; §4.5.2: a line starting with "."
  loses that dot (transparency); §2.3.8 and §4.1.4: CR and LF only as CRLF.
- SMTP smuggling (CVE-2023-51764/51765/51766): every other end-of-data look-alike (`\\n.\\n`,
  `\\n.\\r\\n`, `\\r.\\r`, `\\r\\n.\\r` ...) contains a bare CR or LF, so refusing bare CR and
  LF anywhere in the data means no two servers can disagree about where a message ends.
- NUL is refused the same way: RFC 5322 §2.3/RFC 6152 do not allow it in message text, and
  downstream servers are known to truncate or mangle at NUL.
- RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets including CRLF, not counting the
  transparency dot. A longer line is noted (`bad_line`), not refused here: the session answers
  after the whole message was read, so the client sees the reply in sync.
- RFC 1870 §3: the size is the unstuffed octet count, CRLFs included.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final

from mailgate.errors import UsageError

MAX_TEXT_LINE: Final = 998  # octets without CRLF (RFC 5321 §4.5.3.1.6, RFC 5322 §2.1.1)
# An unfinished line longer than this is passed on instead of held: it is already too long
# (so `bad_line` is set), and holding it would let one endless line take unbounded memory.
MAX_HELD_LINE: Final = 4096
_END: Final = b"\r\n.\r\n"


class Violation(enum.Enum):
    """Why the message text cannot be accepted and the connection must close."""

    BARE_CR_OR_LF = "bare CR or LF in message data"
    NUL = "NUL in message data"


@dataclass(frozen=True, slots=True)
class DataProgress:
    """What one `feed` found.

    chunk:     unstuffed message text to pass on (b"" when nothing new or over the size limit).
    is_done:   the end-of-data line was seen; the message is complete.
    leftover:  bytes after the end-of-data line (pipelined commands), when is_done.
    violation: the data broke the rules; nothing more should be read.
    """

    chunk: bytes
    is_done: bool = False
    leftover: bytes = b""
    violation: Violation | None = None


class DataReader:
    """Reads one message's text. Feed it blocks as they arrive; it returns what they gave.

    size:     unstuffed octets seen so far (also past the limit).
    too_big:  size went over max_message_size; no more chunks are returned.
    bad_line: a text line longer than 998 octets was seen.
    """

    __slots__ = ("_at_line_start", "_finished", "_held", "_max_size", "bad_line", "size", "too_big")

    def __init__(self, max_message_size: int) -> None:
        self._max_size = max_message_size
        self._held = b""  # the unfinished last line (never contains LF)
        self._at_line_start = True  # the DATA command's CRLF precedes the first line
        self._finished = False
        self.size = 0
        self.too_big = False
        self.bad_line = False

    def feed(self, data: bytes) -> DataProgress:
        """Process the next received block. Raises UsageError after the message ended."""
        if self._finished:
            raise UsageError("DataReader.feed() after the end of the message")
        buf = self._held + data if self._held else data
        self._held = b""
        if self._at_line_start and buf.startswith(b".\r\n"):
            body, leftover, is_done = b"", buf[3:], True
        else:
            end = buf.find(_END)
            if end >= 0:
                # the CRLF before the dot ends the message's last line and belongs to it
                body, leftover, is_done = buf[: end + 2], buf[end + 5 :], True
            else:
                last_lf = buf.rfind(b"\n")
                body, leftover, is_done = buf[: last_lf + 1], b"", False
                self._held = buf[last_lf + 1 :]
        text = b""
        if body:
            violation = _check(body)
            if violation is not None:
                return self._stop(violation)
            text = self._unstuff(body)
            self._at_line_start = True
        if not is_done and len(self._held) > MAX_HELD_LINE:
            violation, part = self._release_held()
            if violation is not None:
                return self._stop(violation)
            text = text + part if text else part
        self._finished = is_done
        return DataProgress(self._count(text), is_done, leftover)

    def _unstuff(self, body: bytes) -> bytes:
        """Remove the transparency dot (RFC 5321 §4.5.2) and check line lengths.

        `body` ends with CRLF and has no bare CR/LF, so replacing CRLF "." by CRLF removes
        exactly the first dot of every line but the first, which is handled by hand."""
        text = body.replace(b"\r\n.", b"\r\n")
        if self._at_line_start and text[:1] == b".":
            text = text[1:]
        # Only lines of a text longer than a whole allowed line need measuring.
        if not self.bad_line and len(text) > MAX_TEXT_LINE + 2:
            self.bad_line = _has_long_line(text)
        return text

    def _release_held(self) -> tuple[Violation | None, bytes]:
        """Pass on most of an over-long unfinished line, keeping a final CR (the LF may follow)."""
        held = self._held
        keep = b"\r" if held.endswith(b"\r") else b""
        part = held[:-1] if keep else held
        self._held = keep
        if b"\0" in part:
            return Violation.NUL, b""
        if b"\r" in part:  # part has no LF, so any CR in it is bare
            return Violation.BARE_CR_OR_LF, b""
        if self._at_line_start and part[:1] == b".":
            part = part[1:]
        self._at_line_start = False
        self.bad_line = True
        return None, part

    def _count(self, text: bytes) -> bytes:
        """Add to the size; past the limit, swallow the text (RFC 1870 §6: read to the end)."""
        self.size += len(text)
        if self.size > self._max_size:
            self.too_big = True
        return b"" if self.too_big else text

    def _stop(self, violation: Violation) -> DataProgress:
        self._finished = True
        self._held = b""
        return DataProgress(b"", violation=violation)


def _has_long_line(text: bytes) -> bool:
    """Whether a line of `text` (whole CRLF lines, no bare CR or LF) is longer than
    MAX_TEXT_LINE. A line starting at `start` is short enough exactly when an LF follows within
    MAX_TEXT_LINE + 2 octets; every line up to the last LF of that window is then short too, so
    each step jumps a whole window (one C scan, about a thousand octets), without splitting a
    large message into one bytes object per line."""
    start, window, size = 0, MAX_TEXT_LINE + 2, len(text)
    while size - start > window:  # bounded: every pass moves start forward or returns
        lf = text.rfind(b"\n", start, start + window)
        if lf < 0:
            return True
        start = lf + 1
    return False


def _check(body: bytes) -> Violation | None:
    """NUL, bare CR or bare LF in a block of whole lines. Every CR must be in a CRLF and every
    LF too, which is exactly: #CR == #LF == #CRLF (three C-level scans, no Python loop)."""
    if b"\0" in body:
        return Violation.NUL
    pairs = body.count(b"\r\n")
    if body.count(b"\n") != pairs or body.count(b"\r") != pairs:
        return Violation.BARE_CR_OR_LF
    return None


def encode_data(text: bytes) -> bytes:
    """Message text (CRLF lines) to its DATA wire form: dot-stuffed, CRLF-terminated, and
    followed by the end-of-data line. The inverse of DataReader."""
    encoder = DataEncoder()
    return encoder.feed(text) + encoder.finish()


# A lone CR, a lone LF or CRLF: each becomes CRLF (RFC 5321 §2.3.8).
_LINE_END: Final = re.compile(rb"\r\n|\n|\r(?!\n)")


class DataEncoder:
    """Message text to its DATA wire form, given in chunks cut anywhere: bare CR and bare LF
    become CRLF (RFC 5321 §2.3.8: we are never the first hop of an SMTP smuggling chain), the
    last line ends in CRLF, lines starting with "." get another (§4.5.2), and `finish()` adds
    the end-of-data line. The inverse of DataReader.

    `clean_from`: the offset in the text from which CR and LF are known to come only as CRLF
    pairs (a message received over SMTP after its header section: DataReader refused bare CR
    and LF); from there on only dot-stuffing is done, which saves three passes over the text
    (a quarter of the delivery engine's time with 10 MiB messages). None: normalise it all.

    State between chunks: a CR at the end of a chunk is held (it may be half of a CRLF), and
    whether the text so far ends a line (then a leading "." of the next chunk is doubled).
    Stored messages are normally clean CRLF: that case needs no regex.
    """

    __slots__ = ("_at_line_start", "_clean_from", "_cr", "_is_empty", "_offset")

    def __init__(self, clean_from: int | None = None) -> None:
        self._cr = False
        self._at_line_start = True
        self._is_empty = True
        self._clean_from = clean_from
        self._offset = 0  # text octets fed so far

    def feed(self, data: bytes) -> bytes:
        start = self._offset  # where `data` begins in the text (a held CR: one before)
        self._offset += len(data)
        if self._cr:
            data = b"\r" + data
            start -= 1
        self._cr = data.endswith(b"\r")
        if self._cr:
            data = data[:-1]
        if self._clean_from is None:
            return self._encode(data)
        cut = self._clean_from - start
        if cut <= 0:
            return self._stuff(data)
        if cut >= len(data):
            return self._encode(data)
        if data[cut - 1 : cut + 1] == b"\r\n":
            cut += 1  # a CRLF across the border stays one line end
        return self._encode(data[:cut]) + self._stuff(data[cut:])

    def finish(self) -> bytes:
        """The rest (a held CR is a bare one), a CRLF if the text does not end with one, and
        the end-of-data line."""
        out = self._encode(b"\r" if self._cr else b"")
        self._cr = False
        if not self._is_empty and not self._at_line_start:
            out += b"\r\n"
        return out + b".\r\n"

    def _encode(self, data: bytes) -> bytes:
        if not data:
            return b""
        pairs = data.count(b"\r\n")
        if data.count(b"\n") != pairs or data.count(b"\r") != pairs:
            data = _LINE_END.sub(b"\r\n", data)
        return self._stuff(data)

    def _stuff(self, data: bytes) -> bytes:
        """Dot-stuffing of text whose CR and LF come only as CRLF."""
        if not data:
            return b""
        if self._at_line_start and data.startswith(b"."):
            data = b"." + data
        data = data.replace(b"\r\n.", b"\r\n..")
        self._at_line_start = data.endswith(b"\r\n")
        self._is_empty = False
        return data

"""The one parse of a message's header section, shared by every stage that reads headers.

Owns: `HeaderSection` (the fields, the raw bytes and where the body starts) and the strict rule
that decides what a header section is. The policy reads its author fields, the stamper its
Date:/Message-ID:/Sender:/Received: fields, the MIME walk checks that it saw the same fields,
and the DKIM signer hashes exactly these fields: nothing can be signed that the policy did not
examine, and no stage can see a field another stage missed.

The rule (RFC 5322 §2.2, §3.5): the section is a run of fields, each a name of printable ASCII
other than ":" (ftext, §3.6.8) immediately followed by ":", with continuation lines starting
with white space. It ends at the first empty line, or at the first line that cannot be a field
in anybody's reading (then the body starts there, and accept.py inserts the missing empty
line). Refused with 554 5.6.0: a first line that is a continuation, the obsolete white space
between a name and its colon (§4.5, obs-optional: "Content-Type :", "From :") and an mbox
"From " line. Receivers disagree about those: Python's email package reads "Subject :" as the
start of the body, dkimpy raises an error, Postfix and others read the field. Refusing them is
the one reading every stage can share; no stage ever reads them.
A header section longer than the limit is refused with 552 5.3.4 before any of it is examined.

Built from the first bytes of the message only (`parse` takes a prefix, `read` reads one in
chunks from a stream), so a caller can keep the body on disk and hand the body offset along.

Must not: decode addresses (message/authors.py does), touch the spool, or log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import BinaryIO

from mailgate import replies
from mailgate.errors import Rejected

DEFAULT_MAX_HEADER_SIZE = 256 * 1024  # bytes; [limits] max_header_size
_READ_CHUNK = 64 * 1024

# RFC 5322 §3.6.8: field-name = 1*ftext; ftext = %d33-57 / %d59-126 (printable, not ":").
_FIELD = re.compile(rb"([!-9;-~]+):")


@dataclass(frozen=True, slots=True)
class Field:
    """One header field.

    name:  the field name as written ("Content-Type"); `key` is it lower-cased.
    value: the raw bytes after the colon, folding and the final CRLF included (what DKIM's
           relaxed canonicalisation and dkimpy's header list expect).
    """

    name: str
    value: bytes

    @property
    def key(self) -> str:
        return self.name.lower()

    @property
    def raw(self) -> bytes:
        return self.name.encode("ascii") + b":" + self.value

    def text(self) -> str:
        """The unfolded value (RFC 5322 §2.2.3) as text, surrounding white space removed.

        Octets that are not UTF-8 become U+FFFD: such a field can never match an address.
        """
        unfolded = self.value.replace(b"\r\n", b"")
        return unfolded.decode("utf-8", "replace").strip(" \t")


@dataclass(frozen=True, slots=True)
class HeaderSection:
    """The header section of one message.

    fields:      every field, top to bottom.
    raw:         the section's bytes, the CRLF of its last field included, the empty line not.
    body_offset: where the body starts in the message: after the empty line, or at the first
                 line that is not a field, or at the end of a message that is all header (§3.5).
    separated:   True when an empty line ends the section. When False and a body follows,
                 the accept stage inserts the empty line (as Postfix's cleanup does), so that
                 every later reader, whatever its rule for such lines, finds the same body.
    """

    fields: tuple[Field, ...]
    raw: bytes
    body_offset: int
    separated: bool = True

    def get_all(self, name: str) -> list[Field]:
        key = name.lower()
        return [f for f in self.fields if f.key == key]

    def has(self, name: str) -> bool:
        key = name.lower()
        return any(f.key == key for f in self.fields)

    def count(self, name: str) -> int:
        return len(self.get_all(name))

    def names(self) -> list[bytes]:
        """The field names top to bottom, as DKIM's h= selection wants them."""
        return [f.name.encode("ascii") for f in self.fields]

    def without(self, name: str) -> HeaderSection:
        """The section without any field called `name` (the body offset moves accordingly)."""
        kept = tuple(f for f in self.fields if f.key != name.lower())
        raw = b"".join(f.raw for f in kept)
        return HeaderSection(
            kept, raw, self.body_offset - (len(self.raw) - len(raw)), self.separated
        )

    def prepend(self, prefix: bytes) -> HeaderSection:
        """The section with our own CRLF-terminated fields `prefix` in front (parsed by the
        same rule, so a bug in a stamp that broke it would be refused, not signed)."""
        if not prefix:
            return self
        head = parse(prefix + b"\r\n", limit=len(prefix))
        return HeaderSection(head.fields + self.fields, prefix + self.raw,
                             self.body_offset + len(prefix), self.separated)  # fmt: skip


def parse(
    data: bytes, *, limit: int = DEFAULT_MAX_HEADER_SIZE, complete: bool = True
) -> HeaderSection:
    """The header section at the start of `data`, or Rejected.

    `data` is the whole message or a prefix of it; `complete` says whether it is all of the
    message (then a section may end where the message ends).
    Raises Rejected(header_too_big(limit)) when the section is longer than `limit` bytes, and
    Rejected(malformed_header(...)) when a line breaks the rule of the module docstring.
    """
    fields: list[Field] = []
    name: str | None = None
    parts: list[bytes] = []
    pos, size = 0, len(data)
    while True:
        if pos >= size:
            separated, body_offset = False, size  # all header, no body (RFC 5322 §3.5)
            break
        eol = data.find(b"\r\n", pos, limit + 2)
        if eol == -1:
            if not complete or size > limit:
                raise Rejected(replies.header_too_big(limit), f"header section over {limit} bytes")
            eol = size  # the last line of a message that does not end in CRLF (never SMTP)
        line = data[pos:eol]
        if not line:
            separated, body_offset = True, eol + 2
            break
        if line[:1] in (b" ", b"\t"):
            if name is None:
                raise Rejected(
                    replies.malformed_header("the first header line is a continuation line"),
                    "header section starts with a continuation line",
                )
            parts.append(line + b"\r\n")
        else:
            match = _FIELD.match(line)
            if match is None:
                _check_body_start(line)
                separated, body_offset = False, pos
                break
            if name is not None:
                fields.append(Field(name, b"".join(parts)))
            name = match.group(1).decode("ascii")
            parts = [line[match.end() :] + b"\r\n"]
        pos = eol + 2
    if name is not None:
        fields.append(Field(name, b"".join(parts)))
    raw = b"".join(f.raw for f in fields)
    if len(raw) > limit:
        raise Rejected(replies.header_too_big(limit), f"header section over {limit} bytes")
    return HeaderSection(tuple(fields), raw, body_offset, separated)


def read(stream: BinaryIO, *, limit: int = DEFAULT_MAX_HEADER_SIZE) -> HeaderSection:
    """`parse` over a stream positioned at the start of the message: reads chunks only until
    the section has certainly ended (an empty line) or `limit` is passed, then parses."""
    buf = bytearray()
    while True:
        chunk = stream.read(_READ_CHUNK)
        if not chunk:
            return parse(bytes(buf), limit=limit, complete=True)
        start = max(0, len(buf) - 3)
        buf += chunk
        if buf.startswith(b"\r\n") or buf.find(b"\r\n\r\n", start) != -1 or len(buf) > limit + 2:
            return parse(bytes(buf), limit=limit, complete=False)


def _check_body_start(line: bytes) -> None:
    """A line that is not a field and ends the header section without an empty line: refused
    when some reader takes it for a field (RFC 5322 §4.5 obs-optional, white space before the
    colon; an mbox "From " line, which Python's parser skips and then reads on)."""
    if _NAME_THEN_SPACE.match(line) is not None or line.startswith(b"From "):
        raise Rejected(replies.malformed_header(_describe(line)),
                       f"header line that is not a field: {line[:80]!r}")  # fmt: skip


_NAME_THEN_SPACE = re.compile(rb"([!-9;-~]+)[ \t]+:")


def _describe(line: bytes) -> str:
    """What is wrong with a header line, for the reply (ASCII, no client text but a name)."""
    obs = _NAME_THEN_SPACE.match(line)
    if obs is not None:
        return (
            f"white space between the field name {obs.group(1)[:40].decode('ascii')!r}"
            " and its colon"
        )
    if line.startswith(b"From "):
        return "an mbox 'From ' line among the header fields"
    return "a line that is neither a header field nor a continuation line"

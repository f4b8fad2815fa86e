"""Blocked file types: one bounded walk of a message's MIME tree, no I/O.

Owns: deciding whether a message carries a part that may run as code on the recipient's
machine -- by the name a mail client would save it under (``scanner.blocked_extensions``) or
by its decoded content (PE/MZ, ELF, Mach-O magic) -- and refusing a structure that is too
deep, too large or too ambiguous to inspect. Archives (zip, 7z, rar ...) pass here on purpose:
the seed promises that zipping a file avoids the file-type restriction; their contents still
go to clamd, which unpacks archives itself.

Must not: do I/O, log, or know about clamd. It parses the message exactly once, with the
stdlib ``email`` package (``policy.default``), and decodes each part's payload at most once.

One reading of header sections (issue #11): the accept stage hands over its `HeaderSection`
(message/headers.py), the walk checks that the parser found exactly those top-level fields,
and in every part a header line that is not a field ("Content-Type : ...", white space before
the colon, which the parser takes for the start of the body while other programs take it for
the field) is refused with 554 5.6.0, the rule message/headers.py applies to the top level.

RFCs: 2045 §6 (Content-Transfer-Encoding), 2046 §5.1 (multipart), §5.2.1 (message/rfc822 is
7bit/8bit/binary only), 2183 (Content-Disposition filename), 2231 (parameter continuations and
charsets), 2047 §5 (encoded words; forbidden in quoted parameters, but produced by common
clients and decoded by the rest, so we decode them too).

Bounds: the parser builds message objects through our own factory (a public parameter of
``BytesFeedParser``), which counts every part and its depth as the parser attaches it, and
stops the parse at the first part past a bound. A MIME bomb of thousands of nested or sibling
parts is therefore refused after at most ``max_parts`` objects, whatever its length. The header
fields that get parsed (Content-Type, Content-Disposition, Content-Transfer-Encoding) are
bounded in length, repetition and total size before policy.default parses them, since its
header parser is quadratic on some inputs.
"""

from __future__ import annotations

import binascii
import re
import unicodedata
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from email import policy as email_policy
from email.errors import MissingHeaderBodySeparatorDefect
from email.feedparser import BytesFeedParser
from email.header import decode_header, make_header
from email.message import EmailMessage, Message
from typing import Any

from mailgate import replies
from mailgate.errors import Rejected
from mailgate.message.headers import HeaderSection
from mailgate.message.source import MessageSource, as_source

MAX_DEPTH = 20  # nesting levels below the top-level message; real mail rarely exceeds 5
MAX_PARTS = 500  # message objects in the whole tree, the top-level message included

_BASE64_JUNK = re.compile(r"[^A-Za-z0-9+/]")
_FEED_CHUNK = 64 * 1024  # bytes handed to the parser at a time

# The header fields that policy.default parses for the walk. Its parser is quadratic in the
# number of encoded words or parameters of one field (a 280 KB Content-Disposition took 12 s),
# so these are bounded before they are parsed. A long RFC 2231 file name stays under 3 KB.
_PARSED_HEADERS = frozenset({"content-type", "content-disposition", "content-transfer-encoding"})
_MAX_PARSED_HEADER = 16 * 1024  # characters in one field, folding included
_MAX_PARSED_HEADER_REPEAT = 4  # fields of one name in one part
_MAX_PARSED_HEADERS_TOTAL = 512 * 1024  # characters of those fields in the whole message

# Bytes of a decoded part looked at for executable magic: the PE header offset may point
# anywhere, but a real PE header is within the first few KiB.
_PE_HEADER_SEARCH = 64 * 1024
# Characters of a part's content kept after the parse when the part is not text: the checks
# read only the start of such a part (see _decoded; 4 characters of quoted-printable can be
# one byte), so a 25 MB attachment is not kept whole in memory while the walk runs.
_KEPT_PAYLOAD = 4 * _PE_HEADER_SEARCH

# "begin 644 name" lines of inline uuencode (and its base64 variant) in text bodies: many
# clients still render them as attachments, with the name given there.
_UUENCODE_BEGIN = re.compile(rb"^begin(?:-base64)? [0-7]{3,4} ([^\r\n]+?)[ \t]*\r?$", re.MULTILINE)

# A lenient look at raw parameter values, next to the strict parse: if a malformed header
# makes the stdlib parser drop a name that a lenient client would still honour, we see it here.
_RAW_NAME_PARAM = re.compile(r"""(?i)(?:^|;)\s*(?:file)?name\s*=\s*"?([^";]*)""")

_MACHO_MAGICS = (
    b"\xfe\xed\xfa\xce",  # 32-bit, big-endian
    b"\xfe\xed\xfa\xcf",  # 64-bit, big-endian
    b"\xce\xfa\xed\xfe",  # 32-bit, little-endian
    b"\xcf\xfa\xed\xfe",  # 64-bit, little-endian
    b"\xca\xfe\xba\xbe",  # universal ("fat") binary; also a Java class file: both run code
    b"\xca\xfe\xba\xbf",  # universal binary with 64-bit offsets
)


@dataclass(frozen=True, slots=True)
class Blocked:
    """A part refused by the file-type check.

    name:   what the recipient would see: the file name, or "part 1.2 (type)" when unnamed.
    reason: why, for the log: "extension .exe" or "content is a PE executable".
    """

    name: str
    reason: str


def check_file_types(
    message: bytes,
    blocked_extensions: Collection[str],
    *,
    max_depth: int = MAX_DEPTH,
    max_parts: int = MAX_PARTS,
) -> None:
    """Refuse a message that carries a blocked file type or cannot be inspected.

    Raises ``Rejected(replies.blocked_file(name))`` for a blocked part and
    ``Rejected(replies.BAD_MIME)`` for a structure past the bounds or too broken to inspect.
    Returns None when every part passes.
    """
    found = find_blocked(message, blocked_extensions, max_depth=max_depth, max_parts=max_parts)
    if found is not None:
        raise Rejected(
            replies.blocked_file(found.name),
            reason=f"blocked file type name={found.name!r} {found.reason}",
        )


def find_blocked(
    message: bytes | MessageSource,
    blocked_extensions: Collection[str],
    *,
    max_depth: int = MAX_DEPTH,
    max_parts: int = MAX_PARTS,
    section: HeaderSection | None = None,
) -> Blocked | None:
    """The first blocked part in document order, or None.

    `section` is the message's parsed header section when the caller has it (accept.py).
    `message` is read in chunks (a MessageSource reads the spool): a message without MIME
    fields is checked a chunk at a time; the MIME parser keeps only the start of every part
    that is not text. Without `section`, a MessageSource is read whole to find its header.
    Raises ``Rejected(replies.BAD_MIME)`` (and nothing else) when the structure cannot be
    inspected: past ``max_depth`` or ``max_parts``, ambiguous, or making the parser fail.
    """
    blocked = frozenset(ext.strip(". ").casefold() for ext in blocked_extensions)
    source = as_source(message)
    start = _plain_body_start(message, section)
    if start is not None:  # one text/plain part: what the walk would check, without the parser
        return _check_text_chunks(source.chunks(start), "part 1 (text/plain)", blocked)
    root = _parse_bounded(source.chunks(), max_depth=max_depth, max_parts=max_parts)
    if section is not None and len(root) != len(section.fields):
        # Unreachable while both follow RFC 5322 §2.2 (headers.py refuses every other line);
        # kept so that a difference can only ever refuse, never let a part through unseen.
        raise Rejected(replies.BAD_MIME, reason="MIME parser and header parse disagree")
    try:
        for path, part, facts in _walk(root):
            found = _check_part(path, part, facts, blocked)
            if found is not None:
                return found
    except Rejected:
        raise
    except Exception as e:
        # The email package is meant to record defects rather than raise, and fuzzing found
        # no input that makes it raise, but past releases did (and deep comment nesting
        # still gives RecursionError). What it cannot decode we cannot inspect, so we refuse.
        # The cause stays chained so that the caller logs the traceback: a bug of ours
        # would show up there rather than hide behind the 554.
        raise Rejected(replies.BAD_MIME, reason=f"MIME walk failed: {_where(e)}") from e
    return None


def extension_of(filename: str) -> str:
    """The extension a desktop would use to pick a program for `filename`, lower-cased.

    Windows ignores trailing dots and spaces (``evil.exe. `` opens as ``evil.exe``), and only
    the last extension counts (``invoice.pdf.exe`` is an ``exe``). Directory parts (``/`` and
    ``\\``) are dropped, as clients save under the base name. Unicode is NFKC-normalised and
    format characters (zero-width, bidi overrides) are removed, so neither full-width letters
    nor a right-to-left override can disguise the extension.
    """
    base = re.split(r"[\\/]", filename)[-1]
    base = unicodedata.normalize("NFKC", base)
    base = "".join(ch for ch in base if unicodedata.category(ch) != "Cf")
    base = base.rstrip(". \t\r\n\x00\x0b\x0c")
    _, dot, ext = base.rpartition(".")
    return ext.strip().casefold() if dot else ""


def is_blocked_name(filename: str, blocked_extensions: Collection[str]) -> bool:
    """True when `filename` ends in one of `blocked_extensions` (given without dots)."""
    ext = extension_of(filename)
    return bool(ext) and ext in {e.strip(". ").casefold() for e in blocked_extensions}


def executable_kind(data: bytes, *, is_text: bool = False) -> str | None:
    """The kind of executable whose magic `data` starts with, or None.

    PE is recognised by ``MZ`` plus the ``PE\\0\\0`` signature at the offset stored at 0x3C.
    A bare ``MZ`` (a DOS program or a damaged PE) counts too, except in a text part, where
    prose can start with "MZ" and Windows would open the file as text anyway.
    """
    if data.startswith(b"\x7fELF"):
        return "an ELF executable"
    if data[:4] in _MACHO_MAGICS:
        return "a Mach-O executable"
    if data.startswith((b"MZ", b"ZM")):
        if len(data) >= 0x40:
            pe_offset = int.from_bytes(data[0x3C:0x40], "little")
            if pe_offset < _PE_HEADER_SEARCH and data[pe_offset : pe_offset + 4] == b"PE\0\0":
                return "a PE executable"
        if not is_text:
            return "an MZ executable"
    return None


# --- parsing under bounds ---------------------------------------------------------


class _TooComplex(Exception):
    """Raised from inside the parser when the tree grows past a bound."""


class _Budget:
    """What one parse may still create: parts, depth, characters of parsed header fields."""

    __slots__ = ("header_chars_left", "max_depth", "parts_left")

    def __init__(self, max_depth: int, max_parts: int) -> None:
        self.max_depth = max_depth
        self.parts_left = max_parts
        self.header_chars_left = _MAX_PARSED_HEADERS_TOTAL


class _BoundedMessage(EmailMessage):
    """An EmailMessage that knows its depth and charges the budget for every child.

    The feed parser attaches every new part to its parent (multipart children and the body
    of message/rfc822 alike) the moment it creates it, before reading the part's content, so
    a bound is enforced as soon as it is crossed.
    """

    def __init__(self, budget: _Budget, policy: Any) -> None:
        super().__init__(policy=policy)
        self._mailgate_budget = budget
        self._mailgate_depth = 0
        self._mailgate_ctype: str | None = None
        self._mailgate_seen: dict[str, int] = {}  # parsed-header fields stored, by name

    # The parser asks each part's content type five times or so, and policy.default parses
    # the Content-Type header afresh every time: that was half the cost of checking a 10 KB
    # message. The answer is kept until a header or the default type changes (the parser
    # sets headers with set_raw and the digest default with set_default_type; the other
    # mutators are covered so that the cache can never go stale).

    def get_content_type(self) -> str:
        if self._mailgate_ctype is None:
            self._mailgate_ctype = super().get_content_type()
        return self._mailgate_ctype

    def set_raw(self, name: str, value: Any) -> None:
        # The parser stores every header with set_raw before anything reads it, so the
        # bounds on the headers that get parsed are enforced here, before policy.default
        # spends time on them.
        key = name.casefold()
        if key in _PARSED_HEADERS:
            if len(value) > _MAX_PARSED_HEADER:
                raise _TooComplex(f"{name} field longer than {_MAX_PARSED_HEADER} characters")
            # Counted here: get_all() would parse the earlier fields.
            seen = self._mailgate_seen.get(key, 0) + 1
            if seen > _MAX_PARSED_HEADER_REPEAT:
                raise _TooComplex(f"{name} field repeated more than {seen - 1} times")
            self._mailgate_seen[key] = seen
            self._mailgate_budget.header_chars_left -= len(value)
            if self._mailgate_budget.header_chars_left < 0:
                raise _TooComplex(f"MIME header fields longer than {_MAX_PARSED_HEADERS_TOTAL}")
        self._mailgate_ctype = None
        super().set_raw(name, value)

    def __setitem__(self, name: str, val: Any) -> None:
        self._mailgate_ctype = None
        super().__setitem__(name, val)

    def __delitem__(self, name: str) -> None:
        self._mailgate_ctype = None
        super().__delitem__(name)

    def add_header(self, _name: str, _value: str, **_params: Any) -> None:
        self._mailgate_ctype = None
        super().add_header(_name, _value, **_params)

    def replace_header(self, _name: str, _value: Any) -> None:
        self._mailgate_ctype = None
        super().replace_header(_name, _value)

    def set_default_type(self, ctype: str) -> None:
        self._mailgate_ctype = None
        super().set_default_type(ctype)

    def set_payload(self, payload: Any, charset: Any = None) -> None:
        # The parser gives a leaf part its whole content at once; see _KEPT_PAYLOAD.
        if (
            isinstance(payload, str)
            and len(payload) > _KEPT_PAYLOAD
            and self.get_content_maintype() != "text"
        ):
            payload = payload[:_KEPT_PAYLOAD]
        super().set_payload(payload, charset)

    def attach(self, payload: Any) -> None:  # typeshed disagrees with itself here
        if isinstance(payload, _BoundedMessage):
            payload._mailgate_depth = self._mailgate_depth + 1
            if payload._mailgate_depth > self._mailgate_budget.max_depth:
                raise _TooComplex(f"nesting deeper than {self._mailgate_budget.max_depth}")
        self._mailgate_budget.parts_left -= 1
        if self._mailgate_budget.parts_left < 0:
            raise _TooComplex("too many MIME parts")
        super().attach(payload)


def _parse_bounded(chunks: Iterable[bytes], *, max_depth: int, max_parts: int) -> _BoundedMessage:
    budget = _Budget(max_depth, max_parts - 1)  # the top-level message is a part too

    def factory(policy: Any = email_policy.default) -> _BoundedMessage:
        return _BoundedMessage(budget, policy)

    try:
        parser = BytesFeedParser(factory, policy=email_policy.default)
        # Fed in slices rather than parsebytes(): no full-size copy of the message as one
        # str, and a bomb is refused at the first slice that crosses a bound.
        for chunk in chunks:
            view = memoryview(chunk)
            for start in range(0, len(view), _FEED_CHUNK):
                parser.feed(bytes(view[start : start + _FEED_CHUNK]))
        root = parser.close()
    except _TooComplex as e:
        raise Rejected(replies.BAD_MIME, reason=f"MIME structure refused: {e}") from None
    except Exception as e:  # see find_blocked: hostile input can make the stdlib raise
        raise Rejected(replies.BAD_MIME, reason=f"MIME parse failed: {_where(e)}") from e
    if not isinstance(root, _BoundedMessage):  # pragma: no cover - the factory made it
        raise Rejected(replies.BAD_MIME, reason="MIME parse returned an unexpected object")
    return root


# --- the walk ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Facts:
    """What the checks need from one part's headers, each header parsed once.

    policy.default builds a structured header object on every access, which costs more than
    the rest of the walk for a small message, so the walk reads each header a single time.
    """

    ctype: str  # the content type as the parser used it ("text/plain" when invalid)
    declared: tuple[str, ...]  # every Content-Type value, case-folded
    names: tuple[str, ...]  # every name a client might save the part under
    cte: str  # Content-Transfer-Encoding, case-folded, "" when absent

    @property
    def maintype(self) -> str:
        return self.ctype.split("/", 1)[0]


def _facts(part: Message) -> _Facts:
    content_types = part.get_all("content-type", [])
    # Exactly the type the parser used (cached by _BoundedMessage, so no new header parse).
    ctype = part.get_content_type()
    dispositions = part.get_all("content-disposition", [])
    cte = str(part.get("content-transfer-encoding", "")).strip().casefold()
    return _Facts(
        ctype=ctype,
        declared=tuple(str(v).casefold() for v in content_types),
        names=tuple(_names(dispositions, "filename") + _names(content_types, "name")),
        cte=cte,
    )


def _walk(root: Message) -> Iterator[tuple[str, Message, _Facts]]:
    """Every part in document order, with its IMAP-style path ("", "1", "1.2" ...).

    Iterative, and bounded because the parse already bounded the tree's size and depth.
    """
    stack: list[tuple[str, Message]] = [("", root)]
    while stack:
        path, part = stack.pop()
        facts = _facts(part)
        _refuse_ambiguous(path, part, facts)
        yield path, part, facts
        payload = part.get_payload() if part.is_multipart() else None
        if isinstance(payload, list):
            children = [
                (f"{path}.{i}" if path else str(i), child)
                for i, child in enumerate(payload, start=1)
                if isinstance(child, Message)
            ]
            stack.extend(reversed(children))


def _refuse_ambiguous(path: str, part: Message, facts: _Facts) -> None:
    """Refuse structures that another MIME parser could read differently from ours.

    A client that finds parts we did not see would show attachments we never checked.
    """
    where = f"part {path or 'top'}"
    if path and any(isinstance(d, MissingHeaderBodySeparatorDefect) for d in part.defects):
        # A part header line that is not a field ("Content-Type : x"): the parser ended the
        # header there and read the field as body text; a program that accepts the obsolete
        # white space before the colon (RFC 5322 §4.5) reads it as this part's type. (The
        # top level is message/headers.py's, which the accept stage applied before the scan.)
        raise Rejected(replies.BAD_MIME, reason=f"{where}: header line that is not a field")
    if len({v.split(";", 1)[0].strip() for v in facts.declared}) > 1:
        raise Rejected(replies.BAD_MIME, reason=f"{where}: conflicting Content-Type headers")
    if facts.maintype not in ("multipart", "message") and any(
        "multipart/" in v or "message/" in v for v in facts.declared
    ):
        # e.g. "Content-Type: (comment) multipart/mixed": the parser saw text, a client may not.
        raise Rejected(replies.BAD_MIME, reason=f"{where}: unparseable container Content-Type")
    if facts.maintype == "multipart" and not part.is_multipart():
        # RFC 2046 §5.1.1: no boundary parameter, or the boundary never appears.
        raise Rejected(replies.BAD_MIME, reason=f"{where}: multipart without usable boundary")
    if (
        facts.maintype == "message"
        and part.is_multipart()
        and facts.cte not in ("", "7bit", "8bit", "binary")
    ):
        # RFC 2046 §5.2.1: an encoded message/rfc822 body is not allowed; the parser would
        # read the base64 text as the inner message and miss what it carries.
        raise Rejected(replies.BAD_MIME, reason=f"{where}: encoded {facts.ctype}")


def _check_part(path: str, part: Message, facts: _Facts, blocked: frozenset[str]) -> Blocked | None:
    if facts.maintype == "multipart":
        return None  # a container's name is never saved by a client; its children are checked
    for name in facts.names:
        ext = extension_of(name)
        if ext and ext in blocked:
            return Blocked(name=_printable(name), reason=f"extension .{ext}")
    if part.is_multipart():
        return None  # message/rfc822: its inner parts are walked next
    is_text = facts.maintype == "text"
    payload = _decoded(part, facts.cte, whole=is_text)
    label = facts.names[0] if facts.names else f"part {path or '1'} ({facts.ctype})"
    if is_text:
        return _check_text(payload, label, blocked)
    kind = executable_kind(payload)
    if kind is not None:
        return Blocked(name=_printable(label), reason=f"content is {kind}")
    return None


def _check_text(payload: bytes, label: str, blocked: frozenset[str]) -> Blocked | None:
    """A decoded text part: executable content, then uuencoded files with blocked names."""
    kind = executable_kind(payload, is_text=True)
    if kind is not None:
        return Blocked(name=_printable(label), reason=f"content is {kind}")
    return _uuencoded_blocked(payload, blocked)


# A header section of well-formed fields (RFC 5322 §2.2: name, colon; or a folded line) none
# of which is a MIME Content-* field: the message is one text/plain part in 7bit
# (RFC 2045 §5.2), the body is its content as it stands, and there is nothing to parse.
_FIELD_LINES = re.compile(rb"(?:[!-9;-~]+:[^\r\n]*\r\n|[ \t][^\r\n]*\r\n)*")
_MIME_FIELD = re.compile(rb"(?:^|\n)content-", re.IGNORECASE)


def _plain_body_start(
    message: bytes | MessageSource, section: HeaderSection | None = None
) -> int | None:
    """Where the body of a message whose header has no MIME fields starts; None when the
    parser must look (any Content-* field, a line that is not a field, or no empty line
    ending the header)."""
    if section is not None:
        if any(f.key.startswith("content-") for f in section.fields):
            return None
        return section.body_offset
    data = message if isinstance(message, bytes) else b"".join(message.chunks())
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    header = data[: end + 2]
    if _MIME_FIELD.search(header) or not _FIELD_LINES.fullmatch(header):
        return None
    return end + 4


def _plain_body(message: bytes, section: HeaderSection | None = None) -> bytes | None:
    """The body of a message whose header has no MIME fields, or None (see above)."""
    start = _plain_body_start(message, section)
    return None if start is None else message[start:]


def _check_text_chunks(
    chunks: Iterator[bytes], label: str, blocked: frozenset[str]
) -> Blocked | None:
    """`_check_text` over a body read in chunks: the executable check on its start, the
    uuencode search line by line (a line split between chunks is joined first)."""
    start = b""
    for chunk in chunks:  # the start: enough for executable_kind's PE header search
        start += chunk
        if len(start) >= _PE_HEADER_SEARCH + 4:
            break
    kind = executable_kind(start, is_text=True)
    if kind is not None:
        return Blocked(name=_printable(label), reason=f"content is {kind}")
    carry = b""  # an unfinished line
    for data in _then(start, chunks):
        data = carry + data
        end = data.rfind(b"\n") + 1
        carry = data[end:]
        if len(carry) > _MAX_UUENCODE_LINE and not carry.startswith(b"begin"):
            carry = b"x"  # not a "begin" line: what follows continues a line starting "x"
        found = _uuencoded_blocked(data[:end], blocked)
        if found is not None:
            return found
    return _uuencoded_blocked(carry, blocked)


_MAX_UUENCODE_LINE = 64 * 1024  # an unfinished line held to see whether it is a "begin" line


def _then(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


def _uuencoded_blocked(text: bytes, blocked: frozenset[str]) -> Blocked | None:
    """The first "begin 644 name" line of `text` (whole lines) whose name is blocked."""
    if b"begin" not in text:  # a C search: most bodies need no regex over every line
        return None
    for match in _UUENCODE_BEGIN.finditer(text):
        name = match.group(1).decode("utf-8", "replace")
        ext = extension_of(name)
        if ext and ext in blocked:
            return Blocked(name=_printable(name), reason=f"uuencoded, extension .{ext}")
    return None


def _decoded(part: Message, cte: str, *, whole: bool) -> bytes:
    """The part's content with its transfer encoding undone (RFC 2045 §6).

    Unless `whole` is asked for, only a prefix long enough for `executable_kind` is decoded
    from a large base64 body: a 30 MB attachment then costs a 128 KiB decode instead of two
    full-size copies.
    """
    raw = part.get_payload()
    if not isinstance(raw, str):
        return b""
    if not whole and cte == "base64" and len(raw) > _PE_HEADER_SEARCH * 2:
        # 4 characters carry 3 bytes; line breaks and junk are dropped before the cut so
        # that the prefix ends on a whole quantum (RFC 2045 §6.8).
        alphabet = _BASE64_JUNK.sub("", raw[: _PE_HEADER_SEARCH * 2])
        alphabet = alphabet[: len(alphabet) - len(alphabet) % 4]
        try:
            return binascii.a2b_base64(alphabet)
        except binascii.Error:
            pass  # let the stdlib's more forgiving decoder below try
    # Other encodings are rarely used for large parts; the stdlib decodes them whole (and
    # only it can give back the original octets of an 8bit body: get_payload() without
    # decode=True replaces them).
    decoded = part.get_payload(decode=True)
    return decoded if isinstance(decoded, bytes) else b""


def _names(headers: list[Any], param: str) -> list[str]:
    """The `param` values of parsed headers, strictly and leniently read, RFC 2047-decoded."""
    names: list[str] = []
    for value in headers:
        params = getattr(value, "params", None)
        if params is not None and params.get(param):
            names.append(str(params[param]))
        # The lenient reading of the same header (see _RAW_NAME_PARAM).
        names.extend(m.group(1) for m in _RAW_NAME_PARAM.finditer(str(value)))
    decoded = [_decode_words(n) for n in names if "=?" in n]
    return [n for n in dict.fromkeys(names + decoded) if n.strip()]


def _decode_words(text: str) -> str:
    """RFC 2047 encoded words left in a parameter value, decoded; the text itself on failure."""
    try:
        return str(make_header(decode_header(text)))
    except (LookupError, UnicodeError, ValueError):
        return text


def _printable(name: str) -> str:
    """The name as one printable line, for the reply and the log."""
    return "".join(ch if ch.isprintable() else "?" for ch in name)[:200]


def _where(e: BaseException) -> str:
    """ "ValueError at base64mime.py:123": the exception type and its innermost frame."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return type(e).__name__
    filename = tb.tb_frame.f_code.co_filename.rsplit("/", 1)[-1]
    return f"{type(e).__name__} at {filename}:{tb.tb_lineno}"

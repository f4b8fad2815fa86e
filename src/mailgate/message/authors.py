"""The author and sender fields of a header section, read strictly.

Owns: turning every From:, Sender:, Resent-From: and Resent-Sender: field of a `HeaderSection`
into `identity.AuthorField` values, or refusing the message (554 5.6.0 naming the field) when a
field cannot be read the way every receiver would read it. Anything a mail program might show
as an address must end up either as a `Mailbox` the policy decides on, or refused: it is never
passed over as "not an address", which the policy would treat as foreign.

The grammar is RFC 5322 §3.4 without the obsolete forms (§4.4) and with RFC 6532's UTF-8:

    mailbox-list = mailbox *("," mailbox)         From:, Resent-From:
    mailbox      = [phrase] "<" addr-spec ">" / addr-spec   Sender:, Resent-Sender: (exactly one)
    addr-spec    = dot-atom "@" dot-atom           (then identity.normalize on the domain)

Refused, each with its reason in the reply: an empty field; a group ("undisclosed:;"); a quoted
local part; a domain literal ("[192.0.2.1]") or a quoted domain; an RFC 2047 encoded word
inside an address ("=?utf-8?q?ceo=40example.org?="), which some programs decode; a domain that
does not normalise (trailing dot, empty label, characters no host name may have; see
identity.py) or is not written canonically (A-labels or U-labels, any case: "example。org" and
"ｅｘａｍｐｌｅ.org" normalise to example.org, but a receiver that does not apply UTS-46 shows
another domain); octets that are not UTF-8 and control characters; more than one From: or Sender:
field (RFC 5322 §3.6: at most one; receivers pick different ones). Resent-* fields may repeat,
one set per resending (§3.6.6), and every one is read.

Display names and comments are decoded (RFC 2047, then NFKC, which turns "＠" into "@"), and an
address written in them ("ceo@example.org" <x@gmail.test>) is returned as `shown`.

Must not: decide anything about the addresses (policy.py does), or do I/O.
"""

from __future__ import annotations

import re
import unicodedata
from email.header import decode_header, make_header

from mailgate import replies
from mailgate.errors import Rejected
from mailgate.identity import AuthorField, BadDomain, Mailbox, is_canonical, normalize
from mailgate.message.headers import HeaderSection

# field key -> (usual spelling, may hold a list of mailboxes, may appear more than once)
AUTHOR_FIELDS: dict[str, tuple[str, bool, bool]] = {
    "from": ("From", True, False),
    "sender": ("Sender", False, False),
    "resent-from": ("Resent-From", True, True),
    "resent-sender": ("Resent-Sender", False, True),
}

# RFC 5322 §3.2.3 atext; RFC 6532 §3.2 adds every non-ASCII character (UTF8-non-ascii).
_ATEXT_ASCII = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)
# The same ASCII set as a run (the atom reader's fast path); the test checks they agree.
_ASCII_ATEXT_RUN = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")
# Something in a display name or comment that a reader takes for an address. Deliberately wide
# (every character but the delimiters), so that look-alike characters stay in the match.
_SHOWN_ADDRESS = re.compile(r"""([^\s<>()\[\],;:"'@]+)@([^\s<>()\[\],;:"'@]+)""")
_TRAILING_STOPS = ".\u3002\uff0e\uff61"
_ENCODED_WORD = re.compile(r"=\?[^?\s]*\?[qQbB]\?[^?]*\?=")


class _Unreadable(Exception):
    """The field breaks the strict grammar; str() is the reason for the reply."""


def read_authors(section: HeaderSection) -> tuple[AuthorField, ...]:
    """Every author and sender field of `section`, top to bottom, or Rejected (554 5.6.0)."""
    out: list[AuthorField] = []
    for key, (name, _is_list, may_repeat) in AUTHOR_FIELDS.items():
        if not may_repeat and section.count(key) > 1:
            raise Rejected(
                replies.unreadable_author(name, f"more than one {name}: field"),
                f"{section.count(key)} {name}: fields",
            )
    for field in section.fields:
        spec = AUTHOR_FIELDS.get(field.key)
        if spec is None:
            continue
        name, is_list, _ = spec
        text = field.text()
        try:
            out.append(_read_field(name, text, is_list=is_list))
        except _Unreadable as e:
            raise Rejected(replies.unreadable_author(name, str(e)),
                           f"{name}: {text[:200]!r}: {e}") from None  # fmt: skip
    return tuple(out)


def _read_field(name: str, text: str, *, is_list: bool) -> AuthorField:
    if "\ufffd" in text:
        raise _Unreadable("octets that are not UTF-8")
    # (a printable text has no control character: one C-level scan for the usual field)
    if not text.isprintable() and any(
        unicodedata.category(ch) == "Cc" and ch != "\t" for ch in text
    ):
        raise _Unreadable("a control character")
    parser = _Parser(text)
    mailboxes = [parser.mailbox()]
    while is_list and parser.take(","):
        mailboxes.append(parser.mailbox())
    parser.cfws()
    if not parser.at_end():
        raise _Unreadable(
            "more than one address" if not is_list and parser.peek() == "," else
            f"unexpected {parser.peek()!r} after the address"
        )  # fmt: skip
    shown = tuple(dict.fromkeys(m for t in parser.display_texts for m in _shown_addresses(t)))
    return AuthorField(name, tuple(mailboxes), shown)


class _Parser:
    """A recursive-descent reader of one unfolded field value (no obsolete syntax)."""

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.display_texts: list[str] = []  # decoded display names and comments

    def at_end(self) -> bool:
        return self.i >= len(self.s)

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def take(self, ch: str) -> bool:
        self.cfws()
        if self.peek() == ch:
            self.i += 1
            return True
        return False

    def cfws(self) -> None:
        """RFC 5322 §3.2.2: white space and (nested) comments; comment text is kept."""
        while not self.at_end():
            ch = self.peek()
            if ch in " \t":
                self.i += 1
            elif ch == "(":
                self.display_texts.append(_decoded(self.comment()))
            else:
                return

    def comment(self) -> str:
        depth, start = 0, self.i
        while not self.at_end():
            ch = self.s[self.i]
            self.i += 1
            if ch == "\\":
                self.i += 1
            elif ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    return self.s[start + 1 : self.i - 1]
        raise _Unreadable("an unclosed comment")

    def mailbox(self) -> Mailbox:
        self.cfws()
        if self.at_end() or self.peek() == ",":
            raise _Unreadable("no address")
        start = self.i
        words = self.phrase()
        self.cfws()
        if self.peek() == "<":
            # The display name as written, quotes and all: some programs decode encoded
            # words that the grammar does not allow there, so the raw text is decoded too.
            # Quotes go without a trace: '"a@"b.org' shows as "a@b.org" in some programs.
            display = self.s[start : self.i].replace('"', "").strip()
            self.i += 1
            mailbox = self.addr_spec()
            if not self.take(">"):
                raise _Unreadable("an address without its closing '>'")
            if words:
                self.display_texts += [unicodedata.normalize("NFKC", display), _decoded(display)]
            return mailbox
        if self.peek() == ":":
            raise _Unreadable("a group (name: addresses;) instead of a mailbox")
        # No angle brackets: the words read so far were the local part of an addr-spec.
        self.i = start
        return self.addr_spec()

    def phrase(self) -> list[str]:
        """Display-name words (atoms, quoted strings, and the "." that real mail puts in
        names such as "John Q. Public"); stops at "<", "@", "," or ":"."""
        words: list[str] = []
        while True:
            self.cfws()
            ch = self.peek()
            if ch == '"':
                words.append(self.quoted())
            elif ch == ".":
                self.i += 1
                words.append(".")
            elif ch and _is_atext(ch):
                words.append(self.atom())
            else:
                return words

    def quoted(self) -> str:
        self.i += 1
        out: list[str] = []
        while not self.at_end():
            ch = self.s[self.i]
            self.i += 1
            if ch == "\\":
                if self.at_end():
                    break
                out.append(self.s[self.i])
                self.i += 1
            elif ch == '"':
                return "".join(out)
            else:
                out.append(ch)
        raise _Unreadable("an unclosed quoted string")

    def atom(self) -> str:
        start = self.i
        while True:  # bounded: every pass moves on at least one character, or returns
            run = _ASCII_ATEXT_RUN.match(self.s, self.i)  # the usual ASCII run, in C
            if run is not None:
                self.i = run.end()
            if self.at_end() or ord(self.s[self.i]) < 128 or not _is_atext(self.s[self.i]):
                return self.s[start : self.i]
            self.i += 1  # one UTF8-non-ascii atext character (RFC 6532 §3.2)

    def dot_atom(self, what: str) -> str:
        """RFC 5322 §3.2.3 dot-atom-text, no white space or comments inside."""
        parts = [self.atom()]
        while self.peek() == ".":
            self.i += 1
            parts.append(self.atom())
        if any(not p for p in parts):
            raise _Unreadable(f"an empty part in the {what} (a leading, trailing or doubled dot)")
        return ".".join(parts)

    def addr_spec(self) -> Mailbox:
        self.cfws()
        if self.peek() == '"':
            raise _Unreadable("a quoted local part")
        local = self.dot_atom("local part")
        self.cfws()
        if self.peek() != "@":
            if "=?" in local:
                raise _Unreadable("an encoded word (RFC 2047) instead of an address")
            raise _Unreadable("an address without '@' and a domain")
        self.i += 1
        self.cfws()
        if self.peek() == "[":
            raise _Unreadable("a domain literal instead of a domain name")
        if self.peek() == '"':
            raise _Unreadable("a quoted domain")
        domain_text = self.dot_atom("domain")
        if "=?" in local or "=?" in domain_text:
            raise _Unreadable("an encoded word (RFC 2047) inside an address")
        try:
            domain = normalize(domain_text)
        except BadDomain as e:
            raise _Unreadable(str(e)) from None
        if not is_canonical(domain_text, domain):
            # "example。org", "ｅｘａｍｐｌｅ.org": a reader that applies UTS-46 shows one domain,
            # one that does not shows another; only the canonical spellings are unambiguous.
            raise _Unreadable(
                f"a domain written with characters that receivers may read differently"
                f" (write {domain})"
            )
        return Mailbox(local, domain)


def _is_atext(ch: str) -> bool:
    return ch in _ATEXT_ASCII or (ord(ch) > 127 and ch.isprintable() and not ch.isspace())


def _decoded(text: str) -> str:
    """A display name or comment as a reader sees it: RFC 2047 words decoded, then NFKC.

    An encoded word with characters other than ASCII in it (RFC 2047 §2: encoded-text is
    printable ASCII) is refused: decoders disagree about it (Python's writes the characters as
    backslash escapes, others decode them as UTF-8), so what it shows cannot be checked.
    """
    if any(not word.isascii() for word in _ENCODED_WORD.findall(text)):
        raise _Unreadable("an encoded word (RFC 2047) with characters other than ASCII in it")
    if "=?" in text:
        try:
            text = str(make_header(decode_header(text)))
        except (LookupError, UnicodeError, ValueError):
            raise _Unreadable("an encoded word (RFC 2047) that cannot be decoded") from None
    return unicodedata.normalize("NFKC", text)


def _shown_addresses(text: str) -> list[Mailbox]:
    """Addresses written in display text. One whose domain does not normalise is no host name
    at all, so no receiver can take it for one of ours; it is left as text."""
    found: list[Mailbox] = []
    for match in _SHOWN_ADDRESS.finditer(text):
        local, domain = match.group(1), match.group(2).rstrip(_TRAILING_STOPS)
        try:
            found.append(Mailbox(local, normalize(domain)))
        except BadDomain:
            continue
    return found

"""The sender-identity invariant as a property test (issue #11).

"Every address a receiver could display as the author or sender is one the user may use, or a
foreign address with our Sender: stamp, or the message is refused."

Hypothesis writes header sections the way an attacker would (obsolete white space before the
colon, RFC 2047 encoded words, folding, Unicode full stops and fullwidth letters, U-labels,
quoted and bracketed domains, trailing dots, groups, comments, duplicates, padding past the
header limit) and runs them through the real accept stage (`accept.Acceptor` with the real
policy, scanner, stamper and DKIM signer over an in-memory directory). The message as it
would be spooled and delivered is then read by three parsers that are not ours: Python's
`email` with the compat32 policy (getaddresses) and with the default policy (structured
headers), and dkimpy (the fields its verifier hashes, whose signature must verify and cover
every author field). Every address any of them finds, in an address or written in a display
name or comment, is judged by an oracle written here from the rule, not from policy.py.

A refusal is always allowed, but it must be a permanent one (5xx): a message that can never
succeed must never get a 451.

CI runs MAILGATE_FUZZ_EXAMPLES examples (default 200, a few seconds); `scripts/fuzz` runs many
more (docs/SECURITY.md, "Fuzzing").
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import email.utils
import os
import re
import unicodedata
from email.header import Header, decode_header, make_header
from pathlib import Path

import idna
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import dkim
from mailgate.accept import Acceptor, SessionFacts, Transaction
from mailgate.config import ScannerConfig
from mailgate.message import dkimkeys
from mailgate.message.dkim import Signer
from mailgate.policy import Policy, Sender
from mailgate.replies import Reply
from mailgate.scan import Scanner
from mailgate.smtp.events import MailFrom, RcptTo
from mailgate.spool.entry import Envelope
from mailgate.spool.incoming import Incoming
from mailgate.values import Trace
from tests.dkim.verifier import ensure_ed25519_verifier
from tests.support.memdir import MemoryDirectory

EXAMPLES = int(os.environ.get("MAILGATE_FUZZ_EXAMPLES", "200"))
fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

INSTITUTION = ("example.org", "college.example.org", "xn--bcher-kva.example")
MAY_USE = {"alice@example.org", "bursar@college.example.org"}  # alice's primary and her grant
PRIMARY = "alice@example.org"
AUTHOR_NAMES = ("from", "sender", "resent-from", "resent-sender")
SELECTOR = "prop"


# --- the site: directory, keys, the accept stage ------------------------------------------


class Capture:
    """A committer that keeps what would be spooled: our prefix, then the message."""

    def __init__(self) -> None:
        self.delivered: bytes | None = None

    async def commit(self, incoming: Incoming, envelope: Envelope, prefix: bytes) -> Envelope:
        self.delivered = prefix + incoming.getvalue()
        return envelope


class Site:
    def __init__(self, base: Path) -> None:
        self.tmp = base / "tmp"
        self.tmp.mkdir(exist_ok=True)
        self.directory = MemoryDirectory("example.org")
        self.directory.add_user("alice", "", "pw")
        self.txt: dict[str, bytes] = {}
        for name in INSTITUTION:  # the default domain is added too, so that it has a key
            self.directory.add_domain(name)
            key = dkimkeys.generate_key(base, name, SELECTOR, dkimkeys.ALGORITHM_ED25519)
            self.directory.add_dkim_key(name, key)
            self.txt[f"{SELECTOR}._domainkey.{name}."] = dkimkeys.dkim_txt_value(key).encode()
        self.directory.grant("bursar@college.example.org", "alice")
        self.policy = Policy(self.directory, smarthost_networks=[])

    def accept(self, message: bytes) -> tuple[Reply, bytes | None]:
        capture = Capture()
        acceptor = Acceptor(
            hostname="mail.example.org", policy=self.policy, committer=capture,
            scanner=Scanner(ScannerConfig()), signer=Signer(self.directory), hop_limit=50,
        )  # fmt: skip
        trace = Trace("client.test", "192.0.2.1", "", "submission", 587, "ESMTPSA",
                            "TLSv1.3:TLS_AES_256_GCM_SHA384", "alice", "PLAIN")  # fmt: skip
        facts = SessionFacts("S1", Sender("submission", "192.0.2.1", "alice"), trace, True)
        txn = Transaction(mail=MailFrom(address=PRIMARY), mail_from=PRIMARY,
                          rcpts=[RcptTo(address="someone@remote.test")])  # fmt: skip
        incoming = Incoming("PROPTEST", self.tmp, None)
        incoming.write(message)
        try:
            reply = asyncio.run(acceptor.accept(facts, txn, incoming))
        finally:
            incoming.abort()  # Capture does not commit: remove a spilled file
        return reply, capture.delivered

    def dnsfunc(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode() if isinstance(name, bytes) else name
        return self.txt.get(text if text.endswith(".") else text + ".")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    ensure_ed25519_verifier()
    return Site(tmp_path_factory.mktemp("keys"))


# --- the oracle ------------------------------------------------------------------------------

_SHOWN = re.compile(r"([^\s<>()\[\],;:\"'@]+)@([^\s<>()\[\],;:\"'@]+)")
_STOPS = "\u3002\uff0e\uff61"


def domain_forms(domain: str) -> set[str]:
    """Every way a receiver might read `domain`: as written, NFKC-folded, with Unicode full
    stops as dots, trailing dots dropped, brackets and quotes removed, and IDNA-encoded."""
    text = unicodedata.normalize("NFKC", domain).strip().strip('"[]')
    for stop in _STOPS:
        text = text.replace(stop, ".")
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf").casefold().rstrip(".")
    forms = {text, domain.casefold()}
    for candidate in list(forms):
        with contextlib.suppress(idna.IDNAError, UnicodeError, ValueError):
            forms.add(idna.encode(candidate, uts46=True).decode("ascii").rstrip("."))
    return forms


def is_institution(domain: str) -> bool:
    return any(
        form == ours or form.endswith("." + ours)
        for form in domain_forms(domain)
        for ours in INSTITUTION
    )


def may_use(local: str, domain: str) -> bool:
    folded = unicodedata.normalize("NFKC", local).casefold()
    return any(f"{folded}@{form}" in MAY_USE for form in domain_forms(domain))


def shown_in(text: str) -> list[tuple[str, str]]:
    """Addresses written in display text, after RFC 2047 decoding and NFKC."""
    with contextlib.suppress(LookupError, UnicodeError, ValueError):
        text = str(make_header(decode_header(text)))
    text = unicodedata.normalize("NFKC", text)
    return [(m.group(1), m.group(2)) for m in _SHOWN.finditer(text)]


def utf8(value: object) -> str:
    """A compat32 header value as a mail program shows it: compat32 keeps 8-bit octets as
    surrogate escapes, or hands back a Header of "unknown-8bit" chunks; both are UTF-8 here."""
    if isinstance(value, Header):
        return "".join(
            chunk.decode("utf-8", "replace") if isinstance(chunk, bytes) else chunk
            for chunk, _charset in decode_header(value)
        )
    return str(value).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def views(message: bytes) -> dict[str, list[tuple[str, str]]]:
    """(local, domain) pairs of every author field, as each outside parser reads it."""
    out: dict[str, list[tuple[str, str]]] = {"compat32": [], "default": [], "dkimpy": []}
    old = email.message_from_bytes(message, policy=email.policy.compat32)
    for name in AUTHOR_NAMES:
        values = [utf8(v) for v in old.get_all(name, [])]
        for display, address in email.utils.getaddresses(values):
            local, _, domain = address.rpartition("@")
            out["compat32"] += [(local, domain)] if address else []
            out["compat32"] += shown_in(display)
        for value in values:
            out["compat32"] += shown_in(value)
    new = email.message_from_bytes(message, policy=email.policy.default)
    for name in AUTHOR_NAMES:
        for header in new.get_all(name, []):
            try:
                addresses = header.addresses
            except Exception:  # an unparseable structured header shows as its text
                addresses = ()
            for a in addresses:
                out["default"].append((utf8(a.username), utf8(a.domain)))
                out["default"] += shown_in(utf8(a.display_name))
            out["default"] += shown_in(utf8(header))
    for name, value in dkim.rfc822_parse(message)[0]:
        if name.decode("ascii", "replace").lower() in AUTHOR_NAMES:
            text = value.decode("utf-8", "replace")
            for _display, address in email.utils.getaddresses([text]):
                local, _, domain = address.rpartition("@")
                out["dkimpy"] += [(local, domain)] if address else []
            out["dkimpy"] += shown_in(text)
    return out


def check_invariant(site: Site, message: bytes) -> None:
    reply, delivered = site.accept(message)
    if not reply.is_positive:
        event(f"refused {reply.code} {reply.status}")
        assert reply.code >= 500, f"a message that can never succeed got {reply.line()}"
        return
    event("accepted")
    assert delivered is not None
    parsed = email.message_from_bytes(delivered, policy=email.policy.compat32)
    stamped = [str(v).strip() for v in parsed.get_all("sender", [])] == [f"<{PRIMARY}>"]
    for parser, pairs in views(delivered).items():
        for local, domain in pairs:
            if may_use(local, domain):
                continue
            assert not is_institution(domain), (parser, local, domain, reply.line())
            assert stamped, ("foreign address without our Sender:", parser, local, domain)
    fields = dkim.rfc822_parse(delivered)[0]
    signatures = [v for n, v in fields if n.lower() == b"dkim-signature"]
    if signatures:
        assert dkim.verify(delivered, dnsfunc=site.dnsfunc), "our signature does not verify"
        h = re.search(rb"h=([^;]*)", re.sub(rb"\s+", b"", signatures[0]))
        assert h is not None
        signed = h.group(1).lower().split(b":")
        for name, _ in fields:
            if name.lower().decode() in AUTHOR_NAMES:
                assert signed.count(name.lower()) > sum(
                    1 for n, _ in fields if n.lower() == name.lower()
                ), "an author field the signature does not cover"


# --- what an attacker writes -----------------------------------------------------------------

LOCALS = ["alice", "bursar", "dean", "ALICE", "ａｌｉｃｅ", "ceo"]
DOMAINS = [
    "example.org", "college.example.org", "hr.example.org", "a.college.example.org",
    "gmail.test", "lists.gmail.test", "xn--bcher-kva.example", "bücher.example",
    "BÜCHER.example", "college\u3002example.org", "ｃｏｌｌｅｇｅ.example.org",
    "COLLEGE.Example.ORG", "college.example.org.", "example.org..", '"college.example.org"',
    "[192.0.2.1]", "[college.example.org]", "example.org\u200b", "straße.example",
    "example\uff0eorg", "example.org\u3002", "xn--bcher-kva.example.", "=?utf-8?q?x?=.org",
]  # fmt: skip
NAMES = {
    "from": ["From", "from", "FROM", "From ", "From\t"],
    "sender": ["Sender", "SENDER", "Sender "],
    "resent-from": ["Resent-From", "resent-from", "Resent-From "],
    "resent-sender": ["Resent-Sender", "Resent-Sender "],
}

PLAIN_DOMAINS = ["example.org", "college.example.org", "gmail.test", "hr.example.org"]
addresses = st.builds(
    lambda local, domain: f"{local}@{domain}",
    st.sampled_from(LOCALS),
    st.sampled_from(PLAIN_DOMAINS) | st.sampled_from(DOMAINS),  # plain ones half of the time
)


def encoded(text: str) -> str:
    return "=?utf-8?q?" + "".join(c if c.isalnum() else f"={ord(c):02X}" for c in text) + "?="


@st.composite
def mailbox_text(draw: st.DrawFn) -> str:
    address, other = draw(addresses), draw(addresses)
    form = draw(st.integers(0, 9) | st.integers(0, 1))  # the common forms more often
    return [
        address,
        f"Someone <{address}>",
        f'"{other}" <{address}>',
        f"{encoded(other)} <{address}>",
        encoded(address),
        f"{address} ({other})",
        f"{address} ({other.replace('@', '＠')})",
        f"Team: {address};",
        f"{address}, {other}",
        f"John Q. Public <{address}>",
    ][form]


def fold(text: str, where: list[int]) -> str:
    """Fold at some of the spaces (RFC 5322 §2.2.3)."""
    parts = text.split(" ")
    out = parts[0]
    for i, part in enumerate(parts[1:]):
        out += ("\r\n " if i in where else " ") + part
    return out


@st.composite
def author_field(draw: st.DrawFn) -> str:
    key = draw(st.sampled_from(list(NAMES)))
    name = draw(st.sampled_from(NAMES[key][:1]) | st.sampled_from(NAMES[key]))
    value = draw(mailbox_text())
    return fold(f"{name}: {value}", draw(st.lists(st.integers(0, 6), max_size=3)))


filler = st.sampled_from([
    "To: someone@remote.test", "Subject: hello", "X-Pad: " + "p" * 200, "MIME-Version: 1.0",
    "Content-Type: text/plain; charset=utf-8", "Date: Thu, 3 Dec 2026 08:00:00 +0000",
    "Subject : hello",
])  # fmt: skip


@st.composite
def header_sections(draw: st.DrawFn) -> bytes:
    fields = draw(st.lists(author_field() | filler, min_size=1, max_size=8))
    if draw(st.sampled_from([False] * 19 + [True])):  # now and then: padding past the limit
        at = draw(st.integers(0, len(fields)))
        fields[at:at] = ["X-Pad: " + "p" * 900] * 300
    body = draw(st.sampled_from(["Hello.\r\n", "", "From: ceo@example.org\r\n"]))
    separator = draw(st.sampled_from(["\r\n", "\r\n", ""]))  # sometimes no empty line
    return ("".join(f + "\r\n" for f in fields) + separator + body).encode("utf-8")


@fuzz
@given(message=header_sections())
def test_every_displayable_author_is_allowed_stamped_or_refused(site: Site, message: bytes) -> None:
    check_invariant(site, message)


# --- the oracle itself must be able to fail ---------------------------------------------------


def test_the_oracle_catches_a_forged_author_without_a_stamp(site: Site) -> None:
    forged = b"From: dean@college.example.org\r\nSubject: x\r\n\r\nbody\r\n"
    for pairs in views(forged).values():
        assert ("dean", "college.example.org") in pairs
    assert is_institution("college\u3002example.org") and is_institution("hr.example.org")
    assert may_use("ALICE", "example.org") and not may_use("dean", "example.org")


def test_the_accept_stage_holds_for_the_known_variants(site: Site) -> None:
    for value in ["From : dean@college.example.org", "From: dean@bücher.example",
                  "From: =?utf-8?q?dean=40college.example.org?= <x@gmail.test>"]:  # fmt: skip
        reply, delivered = site.accept(f"{value}\r\nSubject: x\r\n\r\nbody\r\n".encode())
        assert delivered is None and reply.code in (553, 554), reply

"""The accept stage on messages that outgrew memory: read in chunks, committed unchanged.

A real JournalStore and GroupCommitter, a real Signer and the file-type Scanner, no sockets.
Large messages (spilled to spool/tmp/) and small ones take the same path: what is spooled is
our fields, then the client's header section (as accept changed it), then the client's body
byte for byte, and dkimpy verifies the signature over it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import dkim
from mailgate.accept import Acceptor, SessionFacts, Transaction
from mailgate.config import ScannerConfig
from mailgate.message import dkimkeys
from mailgate.message.dkim import Signer
from mailgate.message.headers import parse
from mailgate.policy import Policy, Sender
from mailgate.replies import Reply
from mailgate.scan import Scanner
from mailgate.scan.attachments import Blocked, find_blocked
from mailgate.smtp.events import MailFrom, RcptTo
from mailgate.spool.group import GroupCommitter
from mailgate.spool.incoming import MEMORY_LIMIT
from mailgate.spool.journal import JournalStore
from mailgate.values import Trace
from tests.support.memdir import MemoryDirectory

PRIMARY = "alice@example.org"


class Site:
    def __init__(self, base: Path) -> None:
        self.directory = MemoryDirectory("example.org")
        self.directory.add_user("alice", "", "pw")
        self.directory.add_domain("example.org")
        key = dkimkeys.generate_key(base, "example.org", "s1", dkimkeys.ALGORITHM_RSA)
        self.directory.add_dkim_key("example.org", key)
        self.txt = {b"s1._domainkey.example.org.": dkimkeys.dkim_txt_value(key).encode()}
        self.store = JournalStore(base / "spool")
        self.acceptor = Acceptor(
            hostname="mail.example.org", policy=Policy(self.directory, smarthost_networks=[]),
            committer=GroupCommitter(self.store), scanner=Scanner(ScannerConfig()),
            signer=Signer(self.directory), hop_limit=50,
        )  # fmt: skip

    def dnsfunc(self) -> Callable[..., bytes | None]:
        def lookup(name: bytes, timeout: float = 5) -> bytes | None:
            return self.txt.get(name)

        return lookup

    def accept(self, message: bytes, *, pieces: int = 7) -> tuple[Reply, bytes | None]:
        """Accept `message` written in `pieces` writes; the reply and what was spooled."""
        incoming = self.store.begin()
        step = max(1, len(message) // pieces)
        for start in range(0, len(message), step):
            incoming.write(message[start : start + step])
        trace = Trace("client.test", "192.0.2.1", "", "submission", 587, "ESMTPSA",
                            "TLSv1.3:TLS_AES_256_GCM_SHA384", "alice", "PLAIN")  # fmt: skip
        facts = SessionFacts("S1", Sender("submission", "192.0.2.1", "alice"), trace, True)
        txn = Transaction(mail=MailFrom(address=PRIMARY), mail_from=PRIMARY,
                          rcpts=[RcptTo(address="someone@remote.test")])  # fmt: skip
        reply = asyncio.run(self.acceptor.accept(facts, txn, incoming))
        spooled = self.store.read_message(incoming.qid) if reply.code == 250 else None
        return reply, spooled


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    yield s
    s.store.close()


HEAD = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: someone@remote.test\r\n"
    b"Subject: a large one\r\n"
    b"Date: Thu, 03 Dec 2026 12:00:00 +0000\r\n"
    b"Message-ID: <large@example.org>\r\n"
)


def body(size: int) -> bytes:
    """CRLF text with the shapes canonicalisation cares about: trailing spaces, tabs, runs
    of spaces, lines starting with ".", empty lines (also at the end)."""
    lines = [b".leading dot", b"trailing space  ", b"tab\there", b"a   b", b"", b"..two"]
    out = bytearray()
    i = 0
    while len(out) < size:
        out += lines[i % len(lines)] + b" %d\r\n" % i
        i += 1
    return bytes(out) + b"\r\n\r\n"


@pytest.mark.parametrize("size", [1000, MEMORY_LIMIT + 1, 3 * MEMORY_LIMIT + 12345])
def test_spooled_body_is_the_clients_and_the_signature_verifies(site: Site, size: int) -> None:
    message = HEAD + b"\r\n" + body(size)
    reply, spooled = site.accept(message)
    assert (reply.code, reply.status) == (250, "2.0.0")
    assert spooled is not None
    assert spooled.endswith(message)  # our fields in front, the client's bytes unchanged
    ours = spooled[: len(spooled) - len(message)]
    assert ours.startswith(b"DKIM-Signature: ")
    assert b"\r\n\r\n" not in ours
    assert dkim.verify(spooled, dnsfunc=site.dnsfunc())


@pytest.mark.parametrize("size", [1000, 2 * MEMORY_LIMIT])
def test_header_without_empty_line_gets_one_in_front_of_the_unchanged_body(
    site: Site, size: int
) -> None:
    text = b"this line is not a header field\r\n" + body(size)
    reply, spooled = site.accept(HEAD + text)
    assert (reply.code, reply.status) == (250, "2.0.0")
    assert spooled is not None
    assert spooled.endswith(HEAD + b"\r\n" + text)
    assert dkim.verify(spooled, dnsfunc=site.dnsfunc())


@pytest.mark.parametrize("size", [1000, 2 * MEMORY_LIMIT])
def test_dropped_sender_field_leaves_the_body_unchanged(site: Site, size: int) -> None:
    # A foreign From: gets our Sender:, and the client's own Sender: goes (RFC 5322 §3.6).
    head = HEAD.replace(b"From: Alice <alice@example.org>", b"From: <someone@elsewhere.test>")
    text = body(size)
    reply, spooled = site.accept(head + b"Sender: <forged@elsewhere.test>\r\n\r\n" + text)
    assert (reply.code, reply.status) == (250, "2.0.0")
    assert spooled is not None
    assert spooled.endswith(head + b"\r\n" + text)
    assert b"forged@" not in spooled
    assert b"Sender: <alice@example.org>\r\n" in spooled


def test_header_over_the_limit_is_refused_before_the_body_is_read(site: Site) -> None:
    huge = b"X-Filler: " + b"a" * 300_000 + b"\r\n"
    reply, spooled = site.accept(HEAD + huge + b"\r\n" + body(2 * MEMORY_LIMIT))
    assert (reply.code, reply.status) == (552, "5.3.4")
    assert spooled is None


class SmallChunks:
    """A MessageSource that yields `size`-byte chunks, to put chunk boundaries everywhere."""

    def __init__(self, data: bytes, size: int) -> None:
        self.data, self.size = data, size

    @property
    def length(self) -> int:
        return len(self.data)

    def chunks(self, start: int = 0, size: int = 0) -> Iterator[bytes]:
        for offset in range(start, len(self.data), self.size):
            yield self.data[offset : offset + self.size]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 4096])
def test_text_body_checks_see_lines_split_between_chunks(size: int) -> None:
    message = HEAD + b"\r\n" + b"hello\r\n" * 50 + b"begin 644 invoice.exe\r\nM9F]O\r\nend\r\n"
    section = parse(message, limit=len(message))
    found = find_blocked(SmallChunks(message, size), ["exe"], section=section)
    assert found == Blocked("invoice.exe", "uuencoded, extension .exe")
    harmless = message.replace(b"invoice.exe", b"invoice.txt")
    assert find_blocked(SmallChunks(harmless, size), ["exe"], section=section) is None


@pytest.mark.parametrize("size", [1, 5, 4096])
def test_executable_at_the_start_of_a_text_body_is_seen_in_small_chunks(size: int) -> None:
    message = HEAD + b"\r\n\x7fELF\x02\x01\x01 rest of it\r\n"
    section = parse(message, limit=len(message))
    found = find_blocked(SmallChunks(message, size), ["exe"], section=section)
    assert found is not None and found.reason == "content is an ELF executable"


def test_mime_walk_fed_in_small_chunks_finds_the_attachment() -> None:
    message = (
        HEAD + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
        b"--XX\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
        b"--XX\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="run.exe"\r\n\r\nAAAA\r\n--XX--\r\n'
    )
    section = parse(message, limit=len(message))
    found = find_blocked(SmallChunks(message, 3), ["exe"], section=section)
    assert found == Blocked("run.exe", "extension .exe")

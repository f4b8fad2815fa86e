"""The MIME walk of a large message in a child process (scan/walker.py, issue #18).

The child must answer exactly what `find_blocked` answers in the worker: for a corpus of
messages (clean, blocked by name, by content, uuencoded, nested, bombs, ambiguous structures,
a walk that raises), the child's result is compared with the in-process walk of the same
bytes. Then what happens when the child dies, and the path through `Scanner.check` with a
spooled message, as the accept stage calls it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import signal
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from mailgate import replies
from mailgate.config import DEFAULT_BLOCKED_EXTENSIONS, ScannerConfig
from mailgate.errors import Rejected, ScannerUnavailable
from mailgate.message.headers import HeaderSection
from mailgate.message.headers import read as read_section
from mailgate.scan import Scanner, _walker
from mailgate.scan.attachments import Blocked, find_blocked
from mailgate.scan.walker import FileSource, Walker, WalkerFailed, WalkError
from mailgate.spool.incoming import MEMORY_LIMIT, Incoming
from tests.unit.test_attachments import (
    ELF,
    PDF,
    PE,
    attachment,
    b64,
    message,
    multipart,
    nested,
    part,
    with_text,
)

BIG = 3 * MEMORY_LIMIT  # past the size from which the scanner walks in the child


def big_b64(data: bytes, size: int = BIG) -> bytes:
    """`data` followed by random-looking bytes, base64 in CRLF lines, about `size` long."""
    filler = bytes((i * 7919) % 251 for i in range(size * 3 // 4))
    return b64(data + filler)


def nested_comments(depth: int) -> bytes:
    """A Content-Disposition whose comments nest `depth` deep: policy.default's header
    parser recurses once per level, so a deep one makes the walk raise RecursionError."""
    disposition = "attachment; filename=x " + "(" * depth + ")" * depth
    return with_text(
        part(f"Content-Type: application/pdf\nContent-Disposition: {disposition}", PDF)
    )


CORPUS: dict[str, bytes] = {
    "clean text and pdf": with_text(attachment('attachment; filename="a.pdf"', PDF)),
    "blocked name": with_text(attachment('attachment; filename="run.exe"')),
    "blocked name, RFC 2231": with_text(attachment("attachment; filename*=UTF-8''r%C3%A9.exe")),
    "blocked name in Content-Type": with_text(
        part('Content-Type: application/octet-stream; name="x.scr"')
    ),
    "PE under a harmless name": with_text(
        part(
            "Content-Type: application/pdf\nContent-Transfer-Encoding: base64\n"
            'Content-Disposition: attachment; filename="a.pdf"',
            b64(PE),
        )
    ),
    "large base64 ELF": with_text(
        part(
            "Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n"
            'Content-Disposition: attachment; filename="data.bin"',
            big_b64(ELF),
        )
    ),
    "large clean base64": with_text(
        part(
            "Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n"
            'Content-Disposition: attachment; filename="data.bin"',
            big_b64(b"just data"),
        )
    ),
    "uuencoded in a large text part": with_text(
        part(
            "Content-Type: text/plain",
            b"line of text\r\n" * (BIG // 14) + b"begin 644 evil.exe\r\nM9F]O\r\nend\r\n",
        )
    ),
    "forwarded message": with_text(
        part("Content-Type: message/rfc822", with_text(attachment('attachment; filename="b.js"')))
    ),
    "nested to the limit": nested(20),
    "nested past the limit": nested(21),
    "flat bomb": message(multipart(*[part("Content-Type: text/plain")] * 600)),
    "multipart without boundary": message(
        b"Content-Type: multipart/mixed\r\n\r\n--x\r\n\r\nhidden\r\n--x--\r\n"
    ),
    "conflicting Content-Type": message(
        b"Content-Type: text/plain\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n"
    ),
    "encoded message/rfc822": with_text(
        part(
            "Content-Type: message/rfc822\nContent-Transfer-Encoding: base64",
            b64(b"From: a\r\n\r\nx"),
        )
    ),
    "part header line that is not a field": with_text(
        b"Content-Type : application/x-msdownload\r\n\r\nMZ"
    ),
    "walk raises RecursionError": nested_comments(3000),
    "no MIME fields at all": b"From: a@example.org\r\nSubject: s\r\n\r\n" + b"text\r\n" * 1000,
}


def outcome(walk: Callable[[], Blocked | None]) -> tuple[str, object, object]:
    """("found", Blocked|None, None) or ("refused", reply, reason) of a walk."""
    try:
        return ("found", walk(), None)
    except Rejected as e:
        return ("refused", e.reply, e.reason)


def on_file(tmp_path: Path, msg: bytes) -> tuple[FileSource, HeaderSection]:
    """`msg` as the accept stage leaves it: its header section as the head, its body in a
    file after a few other bytes (the received header the head replaced)."""
    section = read_section(io.BytesIO(msg), limit=len(msg))
    path = tmp_path / "message.data"
    path.write_bytes(b"OLD HEADER\r\n" + msg[section.body_offset :])
    head = msg[: section.body_offset]
    return FileSource(str(path), head, len(b"OLD HEADER\r\n"), len(msg)), section


@pytest.fixture
def walker() -> Iterator[Walker]:
    w = Walker()
    yield w
    w.close()


@pytest.mark.parametrize("name", list(CORPUS))
def test_the_child_answers_what_the_walk_in_the_worker_answers(
    tmp_path: Path, walker: Walker, name: str
) -> None:
    msg = CORPUS[name]
    source, section = on_file(tmp_path, msg)
    assert b"".join(source.chunks()) == msg
    blocked = DEFAULT_BLOCKED_EXTENSIONS
    here = outcome(lambda: find_blocked(msg, blocked, section=section))
    there = outcome(lambda: walker.walk(source, blocked, section))
    assert there == here


def test_the_corpus_has_every_kind_of_verdict() -> None:
    verdicts = [
        outcome(partial(find_blocked, m, DEFAULT_BLOCKED_EXTENSIONS)) for m in CORPUS.values()
    ]
    assert ("found", None, None) in verdicts
    assert any(kind == "found" and isinstance(found, Blocked) for kind, found, _ in verdicts)
    assert any(kind == "refused" for kind, _, _ in verdicts)


def test_the_walks_exception_comes_back_as_the_refusals_cause(
    tmp_path: Path, walker: Walker
) -> None:
    source, section = on_file(tmp_path, CORPUS["walk raises RecursionError"])
    with pytest.raises(Rejected) as caught:
        walker.walk(source, ["exe"], section)
    assert caught.value.reply == replies.BAD_MIME
    assert caught.value.reason.startswith("MIME walk failed: RecursionError at ")
    assert isinstance(caught.value.__cause__, WalkError)
    assert "RecursionError" in str(caught.value.__cause__)


def test_the_same_child_walks_one_message_after_another(tmp_path: Path, walker: Walker) -> None:
    source, section = on_file(tmp_path, CORPUS["blocked name"])
    assert walker.walk(source, ["exe"], section) == Blocked("run.exe", "extension .exe")
    first = walker.pid
    assert walker.walk(source, ["zip"], section) is None
    assert walker.pid == first is not None


def test_a_dead_child_fails_the_walk_and_the_next_walk_starts_another(
    tmp_path: Path, walker: Walker
) -> None:
    source, section = on_file(tmp_path, CORPUS["blocked name"])
    assert walker.walk(source, ["exe"], section) is not None
    dead = walker.pid
    assert dead is not None
    os.kill(dead, signal.SIGKILL)
    with pytest.raises(WalkerFailed):
        walker.walk(source, ["exe"], section)
    assert walker.walk(source, ["exe"], section) == Blocked("run.exe", "extension .exe")
    assert walker.pid not in (None, dead)


def test_a_child_that_does_not_answer_in_time_is_killed_and_replaced(
    tmp_path: Path, walker: Walker
) -> None:
    source, section = on_file(tmp_path, CORPUS["blocked name"])
    assert walker.walk(source, ["exe"], section, timeout=60) is not None
    stuck = walker.pid
    assert stuck is not None
    os.kill(stuck, signal.SIGSTOP)  # a parse that never ends, as far as the parent can tell
    try:
        with pytest.raises(WalkerFailed, match=r"no answer within 0\.5 s"):
            walker.walk(source, ["exe"], section, timeout=0.5)
        assert walker.pid != stuck
        with pytest.raises(ProcessLookupError):  # killed and reaped
            os.kill(stuck, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stuck, signal.SIGKILL)
    assert walker.walk(source, ["exe"], section, timeout=60) == Blocked("run.exe", "extension .exe")


def test_the_child_ends_when_its_parent_closes_the_pipe(tmp_path: Path) -> None:
    walker = Walker()
    source, section = on_file(tmp_path, CORPUS["clean text and pdf"])
    assert walker.walk(source, ["exe"], section) is None
    child = walker._child
    assert child is not None and child.stdin is not None
    child.stdin.close()
    assert child.wait(timeout=30) == 0
    walker.close()


@pytest.fixture(autouse=True)
def no_child_left() -> Iterator[None]:
    yield
    _walker().close()  # the scanner's child (a worker keeps it; a test run ends it)


def spooled(tmp_path: Path, msg: bytes) -> Incoming:
    """A received message as the session leaves it: spilled to spool/tmp."""
    tmp_path.mkdir(exist_ok=True)
    incoming = Incoming("WALK1", tmp_path, None)
    incoming.write(msg)
    return incoming


def test_the_scanner_has_a_spooled_large_message_walked_by_the_child(tmp_path: Path) -> None:
    msg = with_text(
        part(
            "Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n"
            'Content-Disposition: attachment; filename="payload.bin"',
            big_b64(PE),
        )
    )
    incoming = spooled(tmp_path, msg)
    assert incoming.file_span() is not None
    section = read_section(io.BytesIO(msg), limit=len(msg))
    scanner = Scanner(ScannerConfig(clamd=""))
    with pytest.raises(Rejected) as caught:
        asyncio.run(scanner.check(incoming, section=section))
    assert caught.value.reply == replies.blocked_file("payload.bin")
    assert _walker().pid is not None  # the child answered, not a thread of this process
    harmless = with_text(part("Content-Type: image/png", big_b64(b"png")))
    clean = spooled(tmp_path / "c", harmless)
    verdict = asyncio.run(
        scanner.check(clean, section=read_section(io.BytesIO(harmless), limit=len(harmless)))
    )
    assert verdict.header == "mailgate (file types only) ; clean"


def test_a_child_that_cannot_answer_makes_the_scanner_unavailable(tmp_path: Path) -> None:
    msg = with_text(attachment('attachment; filename="a.pdf"', PDF + b"x" * BIG))
    incoming = spooled(tmp_path, msg)
    section = read_section(io.BytesIO(msg), limit=len(msg))
    scanner = Scanner(ScannerConfig(clamd=""))
    walker = _walker()
    asyncio.run(scanner.check(incoming, section=section))
    assert walker.pid is not None
    # The spill file is gone under the child (a disk error, say): it cannot read the message,
    # which is no verdict on the message (not 554 5.6.0 as a parse error would be), but 451.
    os.unlink(incoming.spill_path)
    with pytest.raises(ScannerUnavailable, match=r"reading .*WALK1\.data"):
        asyncio.run(scanner.check(incoming, section=section))
    assert walker.pid is not None  # the same child, still there for the next message


def test_base64_helper_is_plain_base64() -> None:
    assert base64.b64decode(big_b64(b"MZ", 100))[:2] == b"MZ"

"""The MIME walk of a large spooled message, in a child process of the worker (issue #18).

Owns: one child process per worker process (the interpreter running `main` below, started on
first use and started again after it dies), the messages between them, and `FileSource`, the
message as the child reads it: a head (accept.py's header section) followed by the spooled
file from an offset on. The child runs exactly `attachments.find_blocked` on it and answers
what it found, so the verdicts are those of the walk in the worker, byte for byte
(tests/scan/test_walker.py compares them).

Why a process: the walk is the stdlib ``email`` parser, pure Python, several seconds of CPU for
a 25 MB attachment. On a thread of the worker it held the GIL, and every time the event loop
thread gave the GIL up (each write of a spill file, each poll) it waited up to the switch
interval (5 ms) to get it back: loop turns of 45-65 ms, of which 10-23 ms blocked with the
loop thread neither running nor waiting for a CPU, and NOOPs of other sessions of that worker
answered in 80-140 ms on a quiet machine (PERFORMANCE.md, issue #18). In its own process the
parse competes with the loop only for a CPU, which the kernel shares out by itself; and the
parser's memory (it holds a part's lines, about three times the part's size) is the child's
and is given back when the walk ends.

Must not: be used from the event loop (`walk` blocks until the child answers: scan/__init__.py
calls it from its one walk thread, so a worker walks one large message at a time and has at
most one child); trust what the child says beyond its shape: the answer comes back as JSON,
not as a pickle, because the child has just parsed text from the network. What goes to the
child is a pickle of our own values (path, head, offset, the section, the blocked list).

Protocol, on the child's stdin and stdout: one request or answer per frame, an 8-byte
big-endian length then the bytes. The child exits when its stdin ends (the worker is gone).
"""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mailgate import replies
from mailgate.errors import Rejected
from mailgate.message.headers import HeaderSection
from mailgate.message.source import CHUNK
from mailgate.scan.attachments import Blocked, find_blocked

__all__ = ["FileSource", "Walker", "WalkerFailed"]

_LENGTH = 8  # bytes of a frame's length prefix
_MAX_ANSWER = 1024 * 1024  # an answer is a name and a reason: anything longer is a broken child


class WalkerFailed(Exception):
    """The child died or answered something that is not an answer (accept.py: 451 4.3.0)."""


class _ReadFailed(Exception):
    """The child could not read the spooled message: no verdict (the parser would otherwise
    take the error for a broken message and refuse it for good)."""


class WalkError(Exception):
    """An exception the walk raised in the child, as its formatted traceback: chained to the
    BAD_MIME refusal so that the scanner logs it, as it logs the walk's own exceptions."""


@dataclass(frozen=True, slots=True)
class FileSource:
    """A MessageSource: `head`, then the file at `path` from `offset` on; `length` bytes in
    all (the file may be longer: nothing is appended to a message being scanned)."""

    path: str
    head: bytes
    offset: int
    length: int

    def chunks(self, start: int = 0, size: int = CHUNK) -> Iterator[bytes]:
        if start < len(self.head):
            yield self.head[start:]
            start = len(self.head)
        left = self.length - start
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset + start - len(self.head))
                for _ in range(left // size + 1):  # bounded by the length
                    chunk = f.read(min(size, left))
                    if not chunk:
                        return
                    left -= len(chunk)
                    yield chunk
        except OSError as e:
            raise _ReadFailed(f"reading {self.path}: {e.strerror or e}") from None


class Walker:
    """The parent's side: one child, asked one message at a time. Thread-safe (one lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._child: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The running child's process id, if one runs."""
        child = self._child
        return child.pid if child is not None and child.poll() is None else None

    def walk(
        self,
        source: FileSource,
        blocked_extensions: Collection[str],
        section: HeaderSection | None = None,
        timeout: float | None = None,
    ) -> Blocked | None:
        """`find_blocked(source, blocked_extensions, section=section)`, run by the child.

        Returns and raises what find_blocked does (Rejected with BAD_MIME, its reason, and
        a WalkError with the child's traceback as the cause when the walk raised), and
        WalkerFailed when the child cannot answer, or has not answered after `timeout`
        seconds (it is killed: a parse that never ends must not stop every later walk of
        this worker); the next call starts a new child."""
        request = pickle.dumps((source, sorted(blocked_extensions), section))
        with self._lock:
            child = self._running()
            try:
                assert child.stdin is not None and child.stdout is not None
                _send(child.stdin, request)
                # Nothing is buffered from an earlier answer (each is read exactly), so the
                # pipe itself says when this one starts.
                if not select.select([child.stdout], [], [], timeout)[0]:
                    raise WalkerFailed(f"no answer within {timeout:g} s")
                answer = _receive(child.stdout)
            except (OSError, ValueError, WalkerFailed) as e:
                self._stop(child)
                raise WalkerFailed(f"MIME walk process failed: {e}") from None
        return _result(answer)

    def close(self) -> None:
        with self._lock:
            if self._child is not None:
                self._stop(self._child)

    def _running(self) -> subprocess.Popen[bytes]:
        child = self._child
        if child is not None and child.poll() is None:
            return child
        package_root = str(Path(__file__).resolve().parents[2])  # where `mailgate` is
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH", "")) if p
        )
        self._child = subprocess.Popen(
            # -c, not -m: the package (scan/__init__.py) imports this module before runpy would
            [sys.executable, "-c", "from mailgate.scan.walker import main; main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        return self._child

    def _stop(self, child: subprocess.Popen[bytes]) -> None:
        if self._child is child:
            self._child = None
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()
        if child.poll() is None:
            child.kill()
        child.wait()


def _result(answer: bytes) -> Blocked | None:
    try:
        reply = json.loads(answer)
        if "failed" in reply:
            raise WalkerFailed(f"MIME walk process: {reply['failed']}")
        if "refused" in reply:
            reason, cause = str(reply["refused"]), reply.get("cause")
            refusal = Rejected(replies.BAD_MIME, reason=reason)
            if cause is None:
                raise refusal
            raise refusal from WalkError(str(cause))
        found = reply["found"]
        return None if found is None else Blocked(name=str(found[0]), reason=str(found[1]))
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise WalkerFailed(f"MIME walk process answered {answer[:100]!r}: {e}") from None


def _send(stream: IO[bytes], data: bytes) -> None:
    stream.write(len(data).to_bytes(_LENGTH, "big") + data)
    stream.flush()


def _receive(stream: IO[bytes], limit: int = _MAX_ANSWER) -> bytes:
    size = int.from_bytes(_read_exactly(stream, _LENGTH), "big")
    if size > limit:
        raise WalkerFailed(f"a frame of {size} bytes")
    return _read_exactly(stream, size)


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) != size:
        raise WalkerFailed("the MIME walk process ended")
    return data


# --- the child ---------------------------------------------------------------------------


def _answer(request: bytes) -> dict[str, Any]:
    source, blocked, section = pickle.loads(request)  # noqa: S301 - from our parent only
    try:
        found = find_blocked(source, blocked, section=section)
    except _ReadFailed as e:
        return {"failed": str(e)}
    except Rejected as e:
        cause = e.__cause__
        if isinstance(cause, _ReadFailed):  # the parser wrapped it
            return {"failed": str(cause)}
        text = None if cause is None else "".join(traceback.format_exception(cause))
        return {"refused": e.reason, "cause": text}
    return {"found": None if found is None else [found.name, found.reason]}


def _trimmer() -> Callable[[], object]:
    """glibc's malloc_trim(0), or nothing elsewhere: the parse of a 25 MB part frees about
    70 MB that glibc would otherwise keep for this process (it idles until the next one)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


def main() -> None:
    """The child: answer requests until stdin ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is the parent's to handle
    trim = _trimmer()
    requests = os.fdopen(os.dup(0), "rb")
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever else writes to stdout goes to the log, not into the protocol
    while True:  # bounded by the parent: ends when stdin does
        try:
            request = _receive(requests, limit=1 << 40)
        except WalkerFailed:
            return
        try:
            _send(answers, json.dumps(_answer(request)).encode("utf-8"))
        except BrokenPipeError:  # the parent is gone
            return
        trim()


if __name__ == "__main__":
    main()

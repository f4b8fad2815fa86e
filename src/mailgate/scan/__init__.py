"""The scan stage: blocked file types, then clamd, for every message before its 250.

Owns: the order of the content checks, the `X-Scanned-By:` value of an accepted message, the
size rule for clamd, and the one log line per verdict:

    scan verdict=clean|virus|blocked|badmime|toobig|unavailable name=... ms=...

Must not: write the reply (accept.py translates the exceptions), touch the spool, or accept a
message unscanned: every failure to get a verdict from clamd is ``ScannerUnavailable``
(451 4.7.1), never "clean".

Order: the file-type check (`attachments`, pure, CPU only) runs first because it is cheap and
refuses without a network round trip; then clamd INSTREAM (`clamd`), skipped only when
``scanner.clamd`` is empty. Archives pass the file-type check and are unpacked by clamd.

Size: clamd refuses a stream longer than its StreamMaxLength ("INSTREAM size limit exceeded").
Scanning only the first bytes would let anything past them through, and a 451 would make the
client retry a message that can never pass, so a message longer than
``scanner.max_stream_size`` is refused permanently with ``replies.too_big_to_scan`` (552 5.3.4),
before connecting. Keep max_stream_size equal to clamd's StreamMaxLength (both 25 MiB by
default), and raise both to ``limits.max_message_size`` to scan everything that is received.
If clamd's limit is the lower one, its refusal is an operator error: 451 and a log line saying so.

Archives: clamd unpacks archives up to its own limits (MaxFileSize, MaxScanSize, MaxRecursion,
MaxFiles, ...) and, by default, answers OK for whatever it did not reach: a zip bomb or a deeply
nested archive came back clean (issue #11). With `AlertExceedsMax yes` in clamd.conf (required,
see docs/SECURITY.md) it answers `Heuristics.Limits.Exceeded.<Limit> FOUND` instead; that is
refused permanently with `replies.UNSCANNABLE_ARCHIVE` (554 5.7.1, verdict=unscannable), not
reported as a virus. Other heuristic alerts (`HeuristicAlerts yes`, clamd's default: encrypted
archives with `AlertEncrypted`, broken executables, phishing) are refused as found viruses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, partial

from mailgate import metrics, replies
from mailgate.config import ScannerConfig
from mailgate.errors import Rejected, ScannerUnavailable
from mailgate.message.headers import HeaderSection
from mailgate.message.source import FileBacked, MessageSource, as_source
from mailgate.scan.attachments import Blocked, find_blocked
from mailgate.scan.clamd import ClamdAddress, ClamdClient
from mailgate.scan.walker import FileSource, Walker, WalkerFailed

__all__ = ["Scanner", "Verdict"]

log = logging.getLogger(__name__)

# Messages above this size are walked off the event loop so that a 50 MB parse does not stall
# every other session (a spooled message with MIME fields by the walk process, scan/walker.py;
# one without, a chunk at a time in a thread); below it, the hop costs more than the parse.
# Such a message is also read from the spool in a thread, a chunk at a time, for clamd.
_THREAD_PARSE_SIZE = 256 * 1024

# clamd's name for "a limit stopped the scan" (MaxFileSize, MaxScanSize, MaxRecursion, MaxFiles,
# ...), reported only with AlertExceedsMax; without it the unscanned rest comes back "OK".
_LIMITS_EXCEEDED = "Heuristics.Limits.Exceeded"

# clamd's VERSION names its signature database, which changes on reload; asking once a minute
# keeps the header honest without a second connection per message.
_VERSION_MAX_AGE = 60.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """An accepted message's scan result.

    header: the value of the `X-Scanned-By:` field, e.g.
            "mailgate (clamd ClamAV 1.4.6/27500/Sat Nov 28 08:14:02 2026) ; clean".
    """

    header: str


class Scanner:
    """Checks one message at a time; one instance per server, shared by every session."""

    def __init__(self, cfg: ScannerConfig) -> None:
        self._cfg = cfg
        self._blocked = frozenset(cfg.blocked_extensions)
        self._client = (
            ClamdClient(
                ClamdAddress.parse(cfg.clamd),
                timeout=cfg.timeout,
                connect_timeout=cfg.connect_timeout,
            )
            if cfg.clamd
            else None
        )
        self._version = ""
        self._version_at = float("-inf")

    async def check(
        self,
        message: bytes | MessageSource,
        log_prefix: str = "",
        section: HeaderSection | None = None,
    ) -> Verdict:
        """Return the verdict of an acceptable message, or raise.

        `message`: bytes, or a MessageSource read in chunks (the spooled message).
        `section`: the message's header section as accept.py parsed it (the MIME walk checks
        it found the same fields).
        Raises ``Rejected`` (blocked_file 554 5.7.1, virus_found 554 5.7.1, BAD_MIME 554 5.6.0,
        too_big_to_scan 552 5.3.4) and ``ScannerUnavailable``; nothing else.
        """
        started = time.perf_counter()
        prefix = f"{log_prefix} " if log_prefix and not log_prefix.endswith(" ") else log_prefix

        def record(verdict: str, name: str = "-", detail: str = "") -> None:
            ms = (time.perf_counter() - started) * 1000
            extra = f" detail={detail!r}" if detail else ""
            log.info("%sscan verdict=%s name=%s ms=%.1f%s", prefix, verdict, name, ms, extra)
            metrics.SCAN_VERDICTS.labels(verdict).inc()
            metrics.SCAN_SECONDS.labels(verdict).observe(ms / 1000)

        source = as_source(message)
        size = source.length
        try:
            if size <= _THREAD_PARSE_SIZE:
                found = find_blocked(source, self._blocked, section=section)
            elif section is not None and not any(
                f.key.startswith("content-") for f in section.fields
            ):  # no MIME parse: a text body read a chunk at a time
                found = await asyncio.to_thread(
                    find_blocked, source, self._blocked, section=section
                )
            else:
                found = await asyncio.get_running_loop().run_in_executor(
                    _large_walks(),
                    partial(_walk_large, source, self._blocked, section, self._cfg.timeout),
                )
        except WalkerFailed as e:
            record("unavailable", detail=str(e))
            raise ScannerUnavailable(str(e)) from None
        except Rejected as e:  # BAD_MIME is the only refusal find_blocked raises
            record("badmime", detail=e.reason)
            if e.__cause__ is not None:  # the email package raised: keep the traceback
                log.warning("%sscan MIME walk error", prefix, exc_info=e.__cause__)
            raise
        if found is not None:
            record("blocked", _token(found.name), found.reason)
            raise Rejected(
                replies.blocked_file(found.name),
                reason=f"blocked file type name={found.name!r}: {found.reason}",
            )

        if self._client is None:
            record("clean", detail="file types only; clamd not configured")
            return Verdict(header="mailgate (file types only) ; clean")

        if size > self._cfg.max_stream_size:
            record("toobig", detail=f"size={size} max_stream_size={self._cfg.max_stream_size}")
            raise Rejected(
                replies.too_big_to_scan(self._cfg.max_stream_size),
                reason=f"{size} bytes exceed scanner.max_stream_size",
            )

        try:
            if size <= _THREAD_PARSE_SIZE:
                result = await self._client.instream(b"".join(source.chunks()))
            else:
                result = await self._client.instream(_read_off_loop(source), size)
            version = await self._clamd_version()
        except ScannerUnavailable as e:
            record("unavailable", detail=str(e))
            raise
        if result.virus is not None and result.virus.startswith(_LIMITS_EXCEEDED):
            record("unscannable", _token(result.virus))
            raise Rejected(replies.UNSCANNABLE_ARCHIVE, reason=f"clamd: {result.virus}")
        if result.virus is not None:
            record("virus", _token(result.virus))
            raise Rejected(replies.virus_found(result.virus), reason=f"clamd: {result.virus}")
        record("clean")
        return Verdict(header=f"mailgate (clamd {version}) ; clean")

    async def _clamd_version(self) -> str:
        assert self._client is not None
        now = time.monotonic()
        if now - self._version_at > _VERSION_MAX_AGE:
            self._version = _header_safe(await self._client.version())
            self._version_at = now
        return self._version


@cache
def _large_walks() -> ThreadPoolExecutor:
    """The one thread of this process that has large MIME messages walked, one at a time:
    the stdlib parser holds a part's lines while it reads them (about three times the part's
    size), so ten concurrent 25 MB attachments would take ten times that (issue #18); and a
    walk of seconds must not hold one of the threads that asyncio.to_thread shares with short
    hops (reading the next chunk for clamd, commits). Made on first use, after the fork."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="mime-walk")


@cache
def _walker() -> Walker:
    """This process's walk child (scan/walker.py), started by its first walk."""
    return Walker()


def _walk_large(
    source: MessageSource,
    blocked: frozenset[str],
    section: HeaderSection | None,
    timeout: float,
) -> Blocked | None:
    """On the walk thread: a spooled message is walked by the child process, which reads
    the file (the parse then neither holds this process's GIL nor its memory) and has
    `timeout` seconds (scanner.timeout, as clamd has) to answer; a message held in memory
    (tests, tools) is walked here."""
    span = source.file_span() if isinstance(source, FileBacked) else None
    if span is None:
        return find_blocked(source, blocked, section=section)
    path, head, offset = span
    source = FileSource(path, head, offset, source.length)
    return _walker().walk(source, blocked, section, timeout=timeout)


async def _read_off_loop(source: MessageSource) -> AsyncIterator[bytes]:
    """The message's chunks, each read in a worker thread (a spilled file on disk)."""
    chunks = source.chunks()
    for _ in range(source.length + 1):  # bounded: every chunk has at least one byte
        chunk = await asyncio.to_thread(next, chunks, b"")
        if not chunk:
            return
        yield chunk


def _header_safe(text: str) -> str:
    """Printable ASCII without parentheses, short: it goes inside a header comment."""
    kept = "".join(ch if " " <= ch <= "~" and ch not in "()\\" else "?" for ch in text)
    return kept[:100]


def _token(text: str) -> str:
    """One log token: no spaces, no quotes, no control characters."""
    return (
        "".join(ch if ch.isprintable() and ch not in " '\"=" else "_" for ch in text)[:200] or "-"
    )

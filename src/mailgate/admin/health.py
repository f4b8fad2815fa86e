"""Readiness: can mail be accepted now? (`GET /readyz`, INTERFACE.md part 2.)

Owns: the checks behind /readyz: the spool is writable and has room for one message of the
largest size, the scanner answers PING (when clamd is configured), the directory answers a
query, and the server is not shutting down. Each check is bounded in time; a check that fails
gives one line naming what is wrong. Shared counters (`[state] url`) that do not answer make
the server degraded, not unready: mail is still accepted on per-process counters, so /readyz
answers 200 and names the reason (`degraded()`). Must not: change anything it checks (the
spool probe is a file it creates and removes in spool/tmp).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from mailgate.errors import MailgateError, ScannerUnavailable
from mailgate.scan.clamd import ClamdAddress, ClamdClient

CHECK_TIMEOUT = 3.0  # seconds per check: a probe that hangs is itself the answer


class Readiness:
    """The checks of one server; `reasons()` is awaited per request."""

    def __init__(
        self,
        *,
        spool: Path,
        min_free: int,
        clamd: str,
        directory_query: Callable[[], object],
        state_ping: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.spool = spool
        self.min_free = min_free  # bytes: one message of limits.max_message_size
        self.clamd = (
            ClamdClient(ClamdAddress.parse(clamd), timeout=CHECK_TIMEOUT,
                        connect_timeout=CHECK_TIMEOUT)
            if clamd else None
        )  # fmt: skip
        self.directory_query = directory_query
        self.state_ping = state_ping  # Redis PING, when [state] url is set
        self.stopping = False

    async def degraded(self) -> list[str]:
        """What works in a lesser way while mail is still accepted (one line each)."""
        if self.state_ping is None:
            return []
        try:
            await asyncio.wait_for(self.state_ping(), CHECK_TIMEOUT)
        except TimeoutError:
            return [f"state: no answer within {CHECK_TIMEOUT:g}s; counting per process"]
        except Exception as e:  # the client's own errors: unreachable is the answer
            return [f"state: {e}; counting per process"]
        return []

    async def reasons(self) -> list[str]:
        if self.stopping:
            return ["shutting down"]
        checks = [self._spool(), self._directory()]
        if self.clamd is not None:
            checks.append(self._scanner())
        found = await asyncio.gather(*checks)
        return [reason for reason in found if reason]

    async def _spool(self) -> str:
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._probe_spool), CHECK_TIMEOUT)
        except TimeoutError:
            return f"spool: no answer from {self.spool} within {CHECK_TIMEOUT:g}s"

    def _probe_spool(self) -> str:
        folder = self.spool / "tmp" if (self.spool / "tmp").is_dir() else self.spool
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".readyz-"):
                pass
            free = os.statvfs(folder)
        except OSError as e:
            return f"spool: not writable: {e.strerror or e}"
        available = free.f_bavail * free.f_frsize
        if available < self.min_free:
            return f"spool: {available} bytes free, less than one largest message ({self.min_free})"
        return ""

    async def _directory(self) -> str:
        try:
            await asyncio.wait_for(asyncio.to_thread(self.directory_query), CHECK_TIMEOUT)
        except TimeoutError:
            return f"directory: no answer within {CHECK_TIMEOUT:g}s"
        except (MailgateError, OSError) as e:
            return f"directory: {e}"
        except Exception as e:  # sqlite3 / driver errors: unreachable is the answer
            return f"directory: {type(e).__name__}: {e}"
        return ""

    async def _scanner(self) -> str:
        assert self.clamd is not None
        try:
            await asyncio.wait_for(self.clamd.ping(), CHECK_TIMEOUT * 2)
        except TimeoutError:
            return f"scanner: clamd at {self.clamd.address} did not answer"
        except ScannerUnavailable as e:
            return f"scanner: {e}"
        return ""

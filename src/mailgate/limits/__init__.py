"""Rate limits, AUTH defence and the compromised-account breaker (issue #6).

Owns: `Limits` (per-listener, per-login and per-network sending limits answered with
450 4.7.1, shadow mode, the breaker trip), `AuthGuard` (failed-AUTH delays and 454 4.7.0),
`suspend_account` (the breaker's clean-up) and the `<spool>/limits.json` snapshot that
`mailgate limits report` reads. With `[state] url`, the same counts are kept in Redis
(`shared`), and `counters.Counters` is the async interface the receiving side calls either way.
Must not: sleep, or import `receive`, `deliver` or `smtp`; the receiving session calls in, never
the reverse. Only `shared` does network I/O and only `shared` and `counters` use asyncio; the
rules are synchronous and take an injectable clock, so they are tested without waiting.
"""

from __future__ import annotations

from mailgate.limits.authguard import AuthDecision, AuthGuard
from mailgate.limits.backend import Backend, MemoryBackend
from mailgate.limits.breaker import Suspension, suspend_account
from mailgate.limits.keys import network_key
from mailgate.limits.rate import BreakerTrip, Limits
from mailgate.limits.snapshot import read_snapshot, snapshot_path, write_snapshot

__all__ = [
    "AuthDecision",
    "AuthGuard",
    "Backend",
    "BreakerTrip",
    "Limits",
    "MemoryBackend",
    "Suspension",
    "network_key",
    "read_snapshot",
    "snapshot_path",
    "suspend_account",
    "write_snapshot",
]

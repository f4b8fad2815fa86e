"""What the receiving side asks about limits: one async interface over shared or local counters.

Owns: choosing where each count is kept. With `[state] url` set, every count is kept in Redis
(limits.shared), shared by every worker and node; without it, or while Redis cannot be reached,
in this process (`Limits`, `AuthGuard`), as a single node always did: mail keeps flowing on
per-process counters, and limits.shared logs one warning line a minute and tries Redis again
by itself. Must not: hold a rule of its own: every decision is `Limits.decide`,
`Limits.crossing`, `AuthGuard.decide` or `AuthGuard.refuse_busy`, given the shared counts.

receive/ calls it (session: check, record, AUTH attempts; serve: connections per address and
the AUTH lock-out at connect). It owns the background task that keeps this process's heartbeat
in Redis and retries the connection counts it could not take back while Redis was away.

Round trips to Redis, for one message on one connection (issue #19): one at connect (the
connection count and the AUTH lock-out in one script, `admit`), one at AUTH (`begin_attempt`;
its end is sent without waiting), none at RCPT and DATA while this process read or recorded
the same counters less than `FRESH` seconds ago (the counts each script returns are kept, so
under load every check is answered from the last record), one after the 250 (the record), and
the close sent without waiting at the end of the loop turn. A count kept for `FRESH` seconds
misses what other processes recorded meanwhile: the overshoot the rules already allow for
messages in flight between check and record (limits.rate), for `FRESH` seconds longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from datetime import datetime
from typing import Literal

from mailgate.limits.authguard import AuthDecision, AuthGuard
from mailgate.limits.backend import DEFAULT_BUCKETS, DEFAULT_WINDOW
from mailgate.limits.keys import login_key, printable
from mailgate.limits.rate import BreakerTrip, Limits, trip_counter_key
from mailgate.limits.shared import HEARTBEAT_INTERVAL, SharedState, StateUnavailable

log = logging.getLogger(__name__)

# Seconds an AUTH attempt stays "in flight" in Redis if its process never ends it (it died):
# longer than the longest delay plus a slow backend's answer.
_IN_FLIGHT_SLACK = 60.0

Admission = Literal["shared", "local", "refused"]

# Seconds the counts a script returned answer a check without asking Redis again.
FRESH = 0.1
_MAX_KEPT = 10_000  # counts kept for that long (subjects: login, network and service)


class Counters:
    """The limits of one server process; `shared` is None without `[state] url`."""

    def __init__(self, limits: Limits, guard: AuthGuard, shared: SharedState | None) -> None:
        self.limits = limits
        self.guard = guard
        self.shared = shared
        # The latest value a script returned for each counter key and each trip key, with when
        # (this process's clock): kept for FRESH seconds.
        self._kept: dict[str, tuple[float, int | str]] = {}
        self._ready: tuple[list[str], list[int]] | None = None  # what decides_now() found

    # --- sending limits and the breaker --------------------------------------------------

    async def check_recipient(
        self, *, service: str, login: str | None, ip: str, rcpt_in_message: int
    ) -> None:
        """Limits.check_recipient over the shared counts: raises Rejected (450 4.7.1)."""
        if not await self._decide(service, login, ip, rcpt_in_message):
            self.limits.check_recipient(service=service, login=login, ip=ip,
                                        rcpt_in_message=rcpt_in_message)  # fmt: skip

    async def check_message(self, *, service: str, login: str | None, ip: str, nrcpt: int) -> None:
        """Limits.check_message over the shared counts: raises Rejected (450 4.7.1)."""
        if not await self._decide(service, login, ip, nrcpt):
            self.limits.check_message(service=service, login=login, ip=ip, nrcpt=nrcpt)

    def decides_now(self, service: str, login: str | None, ip: str) -> bool:
        """True when `check_recipient_now` or `check_message_now`, called next (nothing awaited
        in between), can answer without waiting: the counters are this process's, or the
        shared counts are kept and fresh (and there is no breaker trip to re-arm)."""
        if self.shared is None:
            return True
        keys = self.limits.counter_keys(service, login, ip)
        kept = self._fresh(login, keys)
        if kept is None or kept[0]:
            return False
        self._ready = (keys, kept[1])
        return True

    def check_recipient_now(
        self, *, service: str, login: str | None, ip: str, rcpt_in_message: int
    ) -> None:
        """`check_recipient` when `decides_now` said so: raises Rejected (450 4.7.1)."""
        if not self._decide_now(service, login, ip, rcpt_in_message):
            self.limits.check_recipient(service=service, login=login, ip=ip,
                                        rcpt_in_message=rcpt_in_message)  # fmt: skip

    def check_message_now(self, *, service: str, login: str | None, ip: str, nrcpt: int) -> None:
        """`check_message` when `decides_now` said so: raises Rejected (450 4.7.1)."""
        if not self._decide_now(service, login, ip, nrcpt):
            self.limits.check_message(service=service, login=login, ip=ip, nrcpt=nrcpt)

    def _decide_now(self, service: str, login: str | None, ip: str, nrcpt: int) -> bool:
        ready, self._ready = self._ready, None
        if self.shared is None:
            return False
        assert ready is not None, "decides_now() first"
        counts = dict(zip(*ready, strict=True))
        self.limits.decide(service, login, ip, nrcpt=nrcpt, trip=None,
                           count=lambda key: counts.get(key, 0))  # fmt: skip
        return True

    async def _decide(self, service: str, login: str | None, ip: str, nrcpt: int) -> bool:
        """Decide on the shared counts; False when they could not be read (decide locally)."""
        if self.shared is None:
            return False
        keys = self.limits.counter_keys(service, login, ip)
        kept = self._fresh(login, keys)
        if kept is not None:
            value, totals = kept
        else:
            try:
                value, totals = await self.shared.rate(
                    _trip_name(login), keys, [0] * len(keys),
                    window=DEFAULT_WINDOW, buckets=DEFAULT_BUCKETS,
                )  # fmt: skip
            except StateUnavailable:
                return False
            self._keep(login, keys, value, totals)
        counts = dict(zip(keys, totals, strict=True))
        trip = _decode_trip(login, value) if login and value else None
        if trip is not None and counts.get(trip_counter_key(trip), 0) <= trip.threshold:
            # Fallen back below the threshold: re-armed, it may trip (and be reported) again.
            trip = None
            self._keep(login, keys, "", totals)
            with contextlib.suppress(StateUnavailable):
                await self.shared.clear_trip(_trip_name(login))
        self.limits.decide(service, login, ip, nrcpt=nrcpt, trip=trip,
                           count=lambda key: counts.get(key, 0))  # fmt: skip
        return True

    def _fresh(self, login: str | None, keys: list[str]) -> tuple[str, list[int]] | None:
        """The trip value and the totals of `keys` if every one is kept and fresh."""
        assert self.shared is not None
        since = self.shared.now() - FRESH
        kept = self._kept
        trip = kept.get("trip:" + _trip_name(login))
        if trip is None or trip[0] <= since:
            return None
        totals = []
        for key in keys:
            total = kept.get(key)
            if total is None or total[0] <= since:
                return None
            totals.append(int(total[1]))
        return str(trip[1]), totals

    def _keep(self, login: str | None, keys: list[str], value: str, totals: list[int]) -> None:
        assert self.shared is not None
        kept = self._kept
        if len(kept) >= _MAX_KEPT:
            kept.clear()
        now = self.shared.now()
        kept["trip:" + _trip_name(login)] = (now, value)
        for key, total in zip(keys, totals, strict=True):
            kept[key] = (now, total)

    async def record_message(
        self, *, service: str, login: str | None, ip: str, nrcpt: int
    ) -> BreakerTrip | None:
        """Count an accepted message. Returns a trip to the one process in the cluster that
        tripped the login's breaker (it suspends the account); None everywhere else."""
        if self.shared is None:
            return self.limits.record_message(service=service, login=login, ip=ip, nrcpt=nrcpt)
        keys = self.limits.counter_keys(service, login, ip)
        amounts = [1, max(nrcpt, 0)] * (len(keys) // 2)  # msg, rcpt per scope
        try:
            value, totals = await self.shared.rate(
                _trip_name(login), keys, amounts, window=DEFAULT_WINDOW, buckets=DEFAULT_BUCKETS
            )
        except StateUnavailable:
            return self.limits.record_message(service=service, login=login, ip=ip, nrcpt=nrcpt)
        self._keep(login, keys, value, totals)
        if not login or value:
            return None  # no login, or its trip is already live (and was reported)
        trip = self.limits.crossing(login, self.limits.named_counts(service, login, ip, totals))
        if trip is None:
            return None
        try:
            won = await self.shared.trip_once(_trip_name(login), _encode_trip(trip), DEFAULT_WINDOW)
        except StateUnavailable:
            won = True  # Redis went away just now: suspending twice is harmless, never is not
        self._kept.pop("trip:" + _trip_name(login), None)  # read again at the next check
        if not won:
            return None
        self.limits.note_trip(trip)
        return trip

    # --- the AUTH defence ----------------------------------------------------------------

    async def begin_attempt(self, ip: str, login: str) -> AuthDecision:
        """AuthGuard.begin_attempt over the shared counts (counted atomically in Redis)."""
        if self.shared is None:
            return self.guard.begin_attempt(ip, login)
        cfg = self.guard.cfg
        client, user = self.guard.client_key(ip), login_key(login)
        try:
            status, n_client, n_login, attempt = await self.shared.auth_begin(
                client, user, exempt=self.guard.is_exempt(ip),
                limits=(cfg.auth_refuse_after, cfg.auth_login_refuse_after,
                        cfg.auth_parallel_per_client, cfg.auth_parallel_per_login),
                window=cfg.auth_window, depth=self.guard.state.depth,
                ttl=cfg.auth_max_delay + _IN_FLIGHT_SLACK,
            )  # fmt: skip
        except StateUnavailable:
            return self.guard.begin_attempt(ip, login)
        if status == "busy_client":
            return self.guard.refuse_busy(f"client={client} in_flight")
        if status == "busy_login":
            return self.guard.refuse_busy(f"login={printable(user)} in_flight")
        # The script refused ("refused") with the same thresholds that decide() applies.
        decision = self.guard.decide(client, user, n_client, n_login)
        if decision.is_refused:
            return decision
        return dataclasses.replace(decision, attempt=attempt)

    async def end_attempt(
        self, ip: str, login: str, decision: AuthDecision, *, succeeded: bool, verified: bool
    ) -> None:
        """AuthGuard.end_attempt, where `begin_attempt` counted the attempt."""
        if not decision.attempt:
            self.guard.end_attempt(ip, login, succeeded=succeeded, verified=verified)
            return
        assert self.shared is not None
        outcome = "ok" if succeeded else "failed" if verified else "unverified"
        # Not waited for (the session's answer does not depend on it); if it is lost, the
        # attempt stays in flight until its expiry.
        self.shared.auth_end(self.guard.client_key(ip), login_key(login), decision.attempt,
                             outcome, self.guard.cfg.auth_trust_period)  # fmt: skip

    # --- connections per client address ------------------------------------------------

    async def admit(self, ip: str, maximum: int, *, lockout: bool) -> tuple[Admission, bool]:
        """`open_connection`, and with `lockout` `is_client_refused`, in one round trip:
        (admission, whether the client is locked out of AUTH)."""
        if self.shared is None:
            return "local", lockout and self.guard.is_client_refused(ip)
        asks = lockout and not self.guard.is_exempt(ip)
        try:
            counted, failures = await self.shared.admit(
                ip, maximum, self.guard.client_key(ip) if asks else "",
                self.guard.cfg.auth_window,
            )  # fmt: skip
        except StateUnavailable:
            return "local", lockout and self.guard.is_client_refused(ip)
        return ("shared" if counted else "refused"), asks and self.guard.is_client_refused_at(
            failures
        )

    async def open_connection(self, ip: str, maximum: int) -> Admission:
        """ "shared": counted in Redis (call close_connection); "refused": `ip` has `maximum`
        connections open in the cluster; "local": count it in this process."""
        return (await self.admit(ip, maximum, lockout=False))[0]

    async def close_connection(self, ip: str) -> None:
        """Take back a connection "shared" admitted, once Redis has (see also the _soon one)."""
        assert self.shared is not None
        try:
            await self.shared.conn_close(ip)
        except StateUnavailable:
            self.shared.unclosed[ip] += 1  # taken back by run() once Redis answers again

    def close_connection_soon(self, ip: str) -> None:
        """Take back a connection "shared" admitted, at the end of this loop turn, without
        waiting (one lost with Redis is taken back by run() once Redis answers again)."""
        assert self.shared is not None
        self.shared.conn_close_soon(ip)

    async def run(self) -> None:
        """Keep this process's heartbeat alive in Redis (its connection counts count while it
        does); take back the counts of connections that closed while Redis was away."""
        shared = self.shared
        if shared is None:
            return
        while True:
            with contextlib.suppress(StateUnavailable):
                await shared.heartbeat()
                for ip in list(shared.unclosed):
                    count = shared.unclosed[ip]
                    if count > 0:
                        await shared.conn_close(ip, count)
                    shared.unclosed[ip] -= count  # (more may have closed meanwhile)
                    if shared.unclosed[ip] <= 0:
                        del shared.unclosed[ip]
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def close(self) -> None:
        if self.shared is not None:
            await self.shared.close()


def _trip_name(login: str | None) -> str:
    return login_key(login) if login else "-"


def _encode_trip(trip: BreakerTrip) -> str:
    return f"{trip.metric} {trip.threshold} {trip.count} {trip.at.isoformat()}"


def _decode_trip(login: str, value: str) -> BreakerTrip | None:
    try:
        metric, threshold, count, at = value.split(" ")
        if metric not in ("recipients_per_hour", "messages_per_hour"):
            raise ValueError(metric)
        return BreakerTrip(login, metric, int(count), int(threshold), datetime.fromisoformat(at))
    except ValueError:
        log.warning("state: unreadable breaker trip login=%s ignored", printable(login))
        return None

"""Defence against password guessing on AUTH (RFC 4954): count failures, slow down, refuse.

Owns: failed-AUTH counters per client and per login over a sliding window (`auth_window`,
15 minutes by default), and the decision taken *before* a password is verified: allow, delay
(growing), or refuse with 454 4.7.0 (`replies.TOO_MANY_AUTH_FAILURES`, RFC 4954 §6 "temporary
authentication failure") after which the caller closes the connection. Must not: verify
passwords, sleep (it returns how long the caller should wait), know whether a login exists
(an unknown login is counted and answered exactly like a known one, so refusals reveal
nothing), or do I/O.

How the session uses it:

    decision = guard.begin_attempt(ip, login)   # counts the attempt *now*, as a failure
    if decision.is_refused: send decision.reply, close       # costs us no password hash
    try:
        await asyncio.sleep(decision.delay)                   # 0.0 when allowed at once
        user = await verify(login, password)                  # may raise "unavailable"
    finally:
        guard.end_attempt(ip, login, succeeded=user is not None, verified=not unavailable)

Every attempt is counted when it begins, before its password hash is verified, and stays
counted as a failure unless `end_attempt(succeeded=True)` takes it back: a burst of parallel
connections cannot all pass the guard while the first hashes are still running (issue #11,
class 6). At most `auth_parallel_per_client` attempts of one client and
`auth_parallel_per_login` of one login are in flight (between begin and end) at a time; one
beyond that is refused at once with 454 4.7.0 (`replies.TOO_MANY_AUTH_IN_PROGRESS`), stays
counted as a failure, and the connection is closed. Refused rather than queued: a waiting
attempt would hold a connection for nothing, an honest client rarely opens more than a few
AUTH sessions at the same instant (identical credentials in flight share one hash anyway,
receive.auth), and a refusal costs no hash.

Clients are counted by address (an IPv4 address, or the IPv6 network of `ipv6_prefix`, since
one IPv6 site owns a whole /64); clients in `exempt_networks` (webmail, NAT gateways) are not
counted per client, only per login. A success forgets that login's failures from that client
(the user's own typos) and nothing else: other logins tried from the same client, and the same
login tried from elsewhere, stay counted, so one valid account cannot be used to wash an
attacker's counters. A client that has logged in as a login within `auth_trust_period` is
not subject to that login's lock (nor to its parallel cap), so an attacker cannot lock a user
out of their usual client.

State: every counter of this module lives in `AuthState` (failures per client and per login,
trusted pairs, attempts in flight); `AuthGuard` holds the rules and calls it under one lock.
With `[state] url` the same state lives in Redis (limits.shared: `begin_attempt`'s
read-check-add is one script, in-flight counters expire, so a worker that dies does not leave
them raised), and limits.counters asks `decide` and `refuse_busy` here for the decision.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from mailgate import replies
from mailgate.config import RateLimitsConfig
from mailgate.limits.keys import login_key, network_key, printable
from mailgate.netaddr import in_networks

log = logging.getLogger(__name__)

DEFAULT_MAX_KEYS = 100_000
_MAX_DOUBLINGS = 32  # keeps base * 2**k a finite float whatever the configuration


@dataclass(frozen=True, slots=True)
class AuthDecision:
    """What to do with an AUTH attempt, decided before the password is checked.

    action: "allow" (verify now), "delay" (wait `delay` seconds, then verify) or "refuse"
            (answer `reply` and close the connection; do not verify).
    delay:  seconds to wait before verifying; 0.0 unless action is "delay".
    reply:  replies.TOO_MANY_AUTH_FAILURES when refused, else None.
    reason: for the log only ("client=192.0.2.7 failures=10"); never sent to the client.
    attempt: the shared store's id of an attempt it let through (limits.counters ends it
            there); "" when this process counted it.
    """

    action: Literal["allow", "delay", "refuse"]
    delay: float = 0.0
    reply: replies.Reply | None = None
    reason: str = ""
    attempt: str = ""

    @property
    def is_refused(self) -> bool:
        return self.action == "refuse"

    @property
    def refuse(self) -> bool:
        """The same as is_refused (receive/session.py reads this name)."""
        return self.action == "refuse"


ALLOW = AuthDecision("allow")

_Table = OrderedDict[str, deque[tuple[float, str]]]


class AuthState:
    """Every counter of the AUTH guard, in this process's memory (a restart forgets them).

    failures: per client key and per login key, (time, other side) entries in the window.
    trusted:  (login, client) pairs that logged in, with when.
    inflight: attempts begun and not yet ended, per client key and per login key.
    Not locked: AuthGuard calls it under its lock. Memory is bounded by `max_keys` per table.
    """

    def __init__(self, window: float, depth: int, max_keys: int) -> None:
        self.window = window
        self.depth = depth  # entries per key; more add nothing to a decision
        self.max_keys = max_keys
        self.clients: _Table = OrderedDict()  # client -> (t, login)
        self.logins: _Table = OrderedDict()  # login -> (t, client)
        self.trusted: OrderedDict[tuple[str, str], float] = OrderedDict()  # (login, client)
        self.inflight_clients: dict[str, int] = {}
        self.inflight_logins: dict[str, int] = {}

    def failures(self, table: _Table, key: str, now: float) -> int:
        entries = table.get(key)
        if entries is None:
            return 0
        self._expire(entries, now)
        if not entries:
            del table[key]
            return 0
        return len(entries)

    def add_failure(self, table: _Table, key: str, entry: tuple[float, str]) -> None:
        entries = table.get(key)
        if entries is None:
            if len(table) >= self.max_keys:
                table.popitem(last=False)  # the least recently failing key
            entries = table[key] = deque(maxlen=self.depth)
        else:
            table.move_to_end(key)
        entries.append(entry)

    def forget(self, table: _Table, key: str, other: str) -> None:
        """Drop `key`'s entries whose other side is `other`."""
        entries = table.get(key)
        if entries is None:
            return
        kept = [entry for entry in entries if entry[1] != other]
        if kept:
            table[key] = deque(kept, maxlen=entries.maxlen)
        else:
            del table[key]

    def take_back(self, table: _Table, key: str, other: str) -> None:
        """Drop the newest of `key`'s entries whose other side is `other`."""
        entries = table.get(key)
        if entries is None:
            return
        for i in range(len(entries) - 1, -1, -1):
            if entries[i][1] == other:
                del entries[i]
                break
        if not entries:
            del table[key]

    def is_trusted(self, user: str, client: str, now: float, period: float) -> bool:
        since = self.trusted.get((user, client))
        return since is not None and now - since < period

    def trust(self, user: str, client: str, now: float) -> None:
        self.trusted[(user, client)] = now
        self.trusted.move_to_end((user, client))
        while len(self.trusted) > self.max_keys:
            self.trusted.popitem(last=False)

    @staticmethod
    def inflight(table: dict[str, int], key: str) -> int:
        return table.get(key, 0)

    @staticmethod
    def change_inflight(table: dict[str, int], key: str, delta: int) -> None:
        n = table.get(key, 0) + delta
        if n > 0:
            table[key] = n
        else:
            table.pop(key, None)

    def top(self, table: _Table, n: int, now: float) -> list[tuple[str, int]]:
        counts = []
        for key in list(table):
            count = self.failures(table, key, now)
            if count:
                counts.append((key, count))
        counts.sort(key=lambda kv: (-kv[1], kv[0]))
        return counts[:n]

    def _expire(self, entries: deque[tuple[float, str]], now: float) -> None:
        oldest = now - self.window
        while entries and entries[0][0] <= oldest:
            entries.popleft()


class AuthGuard:
    """The AUTH defence's rules over one `AuthState`."""

    def __init__(
        self,
        cfg: RateLimitsConfig,
        now: Callable[[], float] = time.monotonic,
        *,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        self.cfg = cfg
        self._now = now
        self.max_keys = max_keys
        depth = max(cfg.auth_refuse_after, cfg.auth_login_refuse_after, cfg.auth_delay_after)
        self.state = AuthState(cfg.auth_window, depth, max_keys)
        self._lock = threading.Lock()

    def client_key(self, ip: str) -> str:
        """The client an address is counted as: itself for IPv4, its /ipv6_prefix for IPv6."""
        return network_key(ip, 32, self.cfg.ipv6_prefix)

    def is_client_refused(self, ip: str) -> bool:
        """The client has reached auth_refuse_after: the session may end at connect time,
        before a TLS handshake costs us anything (the AUTH answer would be 454 anyway)."""
        with self._lock:
            if self._is_exempt(ip):
                return False
            n_client = self.state.failures(self.state.clients, self.client_key(ip), self._now())
            return self.is_client_refused_at(n_client)

    def is_client_refused_at(self, n_client: int) -> bool:
        """A client with `n_client` failures in the window is refused at connect."""
        return n_client >= self.cfg.auth_refuse_after

    def before_attempt(self, ip: str, login: str) -> AuthDecision:
        """What `begin_attempt` would decide by the failure counts, without counting."""
        with self._lock:
            return self._decide(ip, login, self._now())

    def begin_attempt(self, ip: str, login: str) -> AuthDecision:
        """Call before verifying the password of `login` from `ip`. Unless refused by the
        failure counts, the attempt is counted as a failure now; unless refused at all, it is
        in flight until `end_attempt()`, which the caller must then call exactly once."""
        with self._lock:
            now = self._now()
            decision = self._decide(ip, login, now)
            if decision.is_refused:
                return decision
            client, user = self.client_key(ip), login_key(login)
            self._add_failure(ip, client, user, now)
            st = self.state
            if not self._is_exempt(ip) and (
                st.inflight(st.inflight_clients, client) >= self.cfg.auth_parallel_per_client
            ):
                return self.refuse_busy(f"client={client} in_flight")
            if not st.is_trusted(user, client, now, self.cfg.auth_trust_period) and (
                st.inflight(st.inflight_logins, user) >= self.cfg.auth_parallel_per_login
            ):
                return self.refuse_busy(f"login={printable(user)} in_flight")
            st.change_inflight(st.inflight_clients, client, 1)
            st.change_inflight(st.inflight_logins, user, 1)
            return decision

    def end_attempt(self, ip: str, login: str, *, succeeded: bool, verified: bool = True) -> None:
        """The attempt `begin_attempt` let through has its answer (or was abandoned, and then
        stays counted). `verified=False`: the backend could not check anything (454), so the
        attempt's count is taken back and nobody is trusted."""
        with self._lock:
            client, user = self.client_key(ip), login_key(login)
            st = self.state
            st.change_inflight(st.inflight_clients, client, -1)
            st.change_inflight(st.inflight_logins, user, -1)
            if succeeded:
                self._succeeded(client, user, self._now())
            elif not verified:
                if not self._is_exempt(ip):
                    st.take_back(st.clients, client, user)
                st.take_back(st.logins, user, client)

    def record_failure(self, ip: str, login: str) -> None:
        """A failed attempt that was not counted by `begin_attempt` (tests, imports)."""
        with self._lock:
            self._add_failure(ip, self.client_key(ip), login_key(login), self._now())

    def record_success(self, ip: str, login: str) -> None:
        """`login` authenticated from `ip`: forget that pair's failures and trust the pair."""
        with self._lock:
            self._succeeded(self.client_key(ip), login_key(login), self._now())

    def snapshot(self, top: int = 20) -> dict[str, Any]:
        """Failure counts for `mailgate limits report`:
        {"window_seconds", "clients": [{"key", "failures", "state"}], "logins": [...]},
        highest first; state is "refused", "delayed" or "counting"."""
        with self._lock:
            now = self._now()
            return {
                "window_seconds": self.cfg.auth_window,
                "clients": self._top(self.state.clients, self.cfg.auth_refuse_after, top, now),
                "logins": self._top(self.state.logins, self.cfg.auth_login_refuse_after, top, now),
            }

    # --- internals ---------------------------------------------------------------------

    def _decide(self, ip: str, login: str, now: float) -> AuthDecision:
        st = self.state
        client, user = self.client_key(ip), login_key(login)
        n_client = 0 if self._is_exempt(ip) else st.failures(st.clients, client, now)
        n_login = st.failures(st.logins, user, now)
        if st.is_trusted(user, client, now, self.cfg.auth_trust_period):
            n_login = 0
        return self.decide(client, user, n_client, n_login)

    def decide(self, client: str, user: str, n_client: int, n_login: int) -> AuthDecision:
        """The rule, given the failures counted against the client (0 when exempt) and the
        login (0 when the pair is trusted): allow, delay or refuse. A shared store
        (limits.shared) counts atomically and asks this."""
        if n_client >= self.cfg.auth_refuse_after:
            return self._refuse(f"client={client} failures={n_client}")
        if n_login >= self.cfg.auth_login_refuse_after:
            return self._refuse(f"login={printable(user)} failures={n_login}")
        excess = max(n_client, n_login) - self.cfg.auth_delay_after
        if excess < 0:
            return ALLOW
        delay = min(
            self.cfg.auth_base_delay * 2.0 ** min(excess, _MAX_DOUBLINGS),
            self.cfg.auth_max_delay,
        )
        return AuthDecision(
            "delay",
            delay=delay,
            reason=f"client={client} client_failures={n_client} login_failures={n_login}",
        )

    def _add_failure(self, ip: str, client: str, user: str, now: float) -> None:
        if not self._is_exempt(ip):
            self.state.add_failure(self.state.clients, client, (now, user))
        self.state.add_failure(self.state.logins, user, (now, client))

    def _succeeded(self, client: str, user: str, now: float) -> None:
        self.state.forget(self.state.clients, client, user)
        self.state.forget(self.state.logins, user, client)
        self.state.trust(user, client, now)

    def _refuse(self, reason: str) -> AuthDecision:
        log.warning("auth refused too_many_failures %s", reason)
        return AuthDecision("refuse", reply=replies.TOO_MANY_AUTH_FAILURES, reason=reason)

    def refuse_busy(self, reason: str) -> AuthDecision:
        log.warning("auth refused too_many_in_flight %s", reason)
        return AuthDecision("refuse", reply=replies.TOO_MANY_AUTH_IN_PROGRESS, reason=reason)

    def is_exempt(self, ip: str) -> bool:
        """Clients in exempt_networks are counted per login only."""
        return in_networks(ip, self.cfg.exempt_networks)

    def _is_exempt(self, ip: str) -> bool:
        return in_networks(ip, self.cfg.exempt_networks)

    def _top(self, table: _Table, refuse_after: int, n: int, now: float) -> list[dict[str, Any]]:
        rows = []
        for key, count in self.state.top(table, n, now):
            if count >= refuse_after:
                state = "refused"
            elif count >= self.cfg.auth_delay_after:
                state = "delayed"
            else:
                state = "counting"
            rows.append({"key": key, "failures": count, "state": state})
        return rows

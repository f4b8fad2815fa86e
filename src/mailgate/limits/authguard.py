"""Defence against password guessing on AUTH (RFC 4954): count failures, slow down, refuse.

Owns: failed-AUTH counters per client and per login over a sliding window (`auth_window`,
15 minutes by default), and the decision taken *before* a password is verified: allow, delay
(growing), or refuse with 454 4.7.0 (`replies.TOO_MANY_AUTH_FAILURES`, RFC 4954 §6 "temporary
authentication failure") after which the caller closes the connection. Must not: verify
passwords, sleep (it returns how long the caller should wait), know whether a login exists
(an unknown login is counted and answered exactly like a known one, so refusals reveal
nothing), or do I/O.

How the session uses it:

    decision = guard.before_attempt(ip, login)
    if decision.is_refused: send decision.reply, close       # costs us no password hash
    await asyncio.sleep(decision.delay)                       # 0.0 when allowed at once
    user = await asyncio.to_thread(directory.verify_password, login, password)
    guard.record_success(ip, login) if user else guard.record_failure(ip, login)

Clients are counted by address (an IPv4 address, or the IPv6 network of `ipv6_prefix`, since
one IPv6 site owns a whole /64); clients in `exempt_networks` (webmail, NAT gateways) are not
counted per client, only per login. A success forgets that login's failures from that client
(the user's own typos) and nothing else: other logins tried from the same client, and the same
login tried from elsewhere, stay counted, so one valid account cannot be used to wash an
attacker's counters. A client that has logged in as a login within `auth_trust_period` is
not subject to that login's lock, so an attacker cannot lock a user out of their usual client.
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
    """

    action: Literal["allow", "delay", "refuse"]
    delay: float = 0.0
    reply: replies.Reply | None = None
    reason: str = ""

    @property
    def is_refused(self) -> bool:
        return self.action == "refuse"

    @property
    def refuse(self) -> bool:
        """The same as is_refused (receive/session.py reads this name)."""
        return self.action == "refuse"


ALLOW = AuthDecision("allow")


class AuthGuard:
    """Failed-AUTH counters of one server process (in memory; a restart forgets them)."""

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
        # Enough entries per key to reach the refusal threshold; older ones add nothing.
        self._depth = max(cfg.auth_refuse_after, cfg.auth_login_refuse_after, cfg.auth_delay_after)
        self._clients: OrderedDict[str, deque[tuple[float, str]]] = OrderedDict()  # (t, login)
        self._logins: OrderedDict[str, deque[tuple[float, str]]] = OrderedDict()  # (t, client)
        self._trusted: OrderedDict[tuple[str, str], float] = OrderedDict()  # (login, client)
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
            n_client = self._count(self._clients, self.client_key(ip), self._now())
            return n_client >= self.cfg.auth_refuse_after

    def before_attempt(self, ip: str, login: str) -> AuthDecision:
        """Call before verifying the password of `login` from `ip`."""
        with self._lock:
            now = self._now()
            client, user = self.client_key(ip), login_key(login)
            n_client = 0 if self._is_exempt(ip) else self._count(self._clients, client, now)
            n_login = self._count(self._logins, user, now)
            if self._is_trusted(user, client, now):
                n_login = 0
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

    def record_failure(self, ip: str, login: str) -> None:
        """The password (or the login) was wrong."""
        with self._lock:
            now = self._now()
            client, user = self.client_key(ip), login_key(login)
            if not self._is_exempt(ip):
                self._append(self._clients, client, (now, user))
            self._append(self._logins, user, (now, client))

    def record_success(self, ip: str, login: str) -> None:
        """`login` authenticated from `ip`: forget that pair's failures and trust the pair."""
        with self._lock:
            now = self._now()
            client, user = self.client_key(ip), login_key(login)
            self._forget(self._clients, client, lambda entry: entry[1] == user)
            self._forget(self._logins, user, lambda entry: entry[1] == client)
            self._trusted[(user, client)] = now
            self._trusted.move_to_end((user, client))
            while len(self._trusted) > self.max_keys:
                self._trusted.popitem(last=False)

    def snapshot(self, top: int = 20) -> dict[str, Any]:
        """Failure counts for `mailgate limits report`:
        {"window_seconds", "clients": [{"key", "failures", "state"}], "logins": [...]},
        highest first; state is "refused", "delayed" or "counting"."""
        with self._lock:
            now = self._now()
            return {
                "window_seconds": self.cfg.auth_window,
                "clients": self._top(self._clients, self.cfg.auth_refuse_after, top, now),
                "logins": self._top(self._logins, self.cfg.auth_login_refuse_after, top, now),
            }

    # --- internals ---------------------------------------------------------------------

    def _refuse(self, reason: str) -> AuthDecision:
        log.warning("auth refused too_many_failures %s", reason)
        return AuthDecision("refuse", reply=replies.TOO_MANY_AUTH_FAILURES, reason=reason)

    def _is_exempt(self, ip: str) -> bool:
        return in_networks(ip, self.cfg.exempt_networks)

    def _is_trusted(self, user: str, client: str, now: float) -> bool:
        since = self._trusted.get((user, client))
        return since is not None and now - since < self.cfg.auth_trust_period

    def _expire(self, entries: deque[tuple[float, str]], now: float) -> None:
        oldest = now - self.cfg.auth_window
        while entries and entries[0][0] <= oldest:
            entries.popleft()

    def _count(
        self, table: OrderedDict[str, deque[tuple[float, str]]], key: str, now: float
    ) -> int:
        entries = table.get(key)
        if entries is None:
            return 0
        self._expire(entries, now)
        if not entries:
            del table[key]
            return 0
        return len(entries)

    def _append(
        self, table: OrderedDict[str, deque[tuple[float, str]]], key: str, entry: tuple[float, str]
    ) -> None:
        entries = table.get(key)
        if entries is None:
            if len(table) >= self.max_keys:
                table.popitem(last=False)  # the least recently failing key
            entries = table[key] = deque(maxlen=self._depth)
        else:
            table.move_to_end(key)
        entries.append(entry)

    @staticmethod
    def _forget(
        table: OrderedDict[str, deque[tuple[float, str]]],
        key: str,
        matches: Callable[[tuple[float, str]], bool],
    ) -> None:
        entries = table.get(key)
        if entries is None:
            return
        kept = [entry for entry in entries if not matches(entry)]
        if kept:
            table[key] = deque(kept, maxlen=entries.maxlen)
        else:
            del table[key]

    def _top(
        self,
        table: OrderedDict[str, deque[tuple[float, str]]],
        refuse_after: int,
        n: int,
        now: float,
    ) -> list[dict[str, Any]]:
        counts = []
        for key in list(table):
            count = self._count(table, key, now)
            if count:
                counts.append((key, count))
        counts.sort(key=lambda kv: (-kv[1], kv[0]))
        rows = []
        for key, count in counts[:n]:
            if count >= refuse_after:
                state = "refused"
            elif count >= self.cfg.auth_delay_after:
                state = "delayed"
            else:
                state = "counting"
            rows.append({"key": key, "failures": count, "state": state})
        return rows

"""Sending rate limits per listener, per login and per client network; the account breaker.

Owns: the decision "may this client send this recipient / this message now?", the counters
behind it (through a `Backend`), shadow mode, the per-login breaker and the snapshot that
`mailgate limits report` reads. Must not: do I/O other than `write_snapshot`, talk SMTP,
sleep, or touch the directory or the spool (the caller acts on a `BreakerTrip`, see
`limits.breaker.suspend_account`).

The nine limits are `{scope}_{metric}` (config.RATE_LIMIT_NAMES): scope `service` counts all
mail through one listener, `login` one AUTH identity across listeners, `ip` one client network
(`ipv4_prefix`, `ipv6_prefix`); metric `messages_per_hour`, `recipients_per_hour` or
`recipients_per_message`. Each value comes from `[ratelimits.<service>]` if set there, else from
`[ratelimits]`; 0 means no limit. Hourly counts are sliding windows (see `limits.backend`).

Only accepted mail is counted (`record_message`, after the 250): a client that keeps retrying
while refused is not locked out for longer (Exim's "leaky" mode). A refusal is always
`450 4.7.1` (RFC 3463 §3.8, "delivery not authorized"; RFC 5321 §4.2.5 allows 450 at RCPT and
DATA), never a silent drop. Concurrent sessions may overshoot a limit by the messages they have
in flight between check and record; the counters are approximate by design.

The breaker counts accepted recipients (and, if configured, messages) per login. Since it only
sees accepted mail it is a backstop for logins whose ordinary limits are off, in shadow mode or
higher than the breaker: a login that crosses it is reported once (`record_message` returns a
`BreakerTrip`) and then refused with 450 until its count falls back below the threshold.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailgate import metrics, replies
from mailgate.config import RATE_LIMIT_NAMES, RateLimitsConfig, ServiceRateLimits
from mailgate.errors import Rejected
from mailgate.limits.backend import Backend, MemoryBackend
from mailgate.limits.keys import login_key, network_key, printable
from mailgate.netaddr import in_networks

log = logging.getLogger(__name__)

SERVICES = ("submission", "submissions", "smarthost")
SNAPSHOT_VERSION = 1
HOUR = 3600.0
TOP = 20  # keys per counter kept in a snapshot

# Checked most specific first, hourly before per message: the first enforced limit exceeded
# is the one the client is told about.
_SCOPES = ("login", "ip", "service")
_METRICS = ("messages_per_hour", "recipients_per_hour", "recipients_per_message")
_COUNTERS = {"messages_per_hour": "msg", "recipients_per_hour": "rcpt"}
_WHAT = {"login": "account", "ip": "network", "service": "service"}


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class BreakerTrip:
    """A login crossed a breaker threshold: suspend it (limits.breaker.suspend_account).

    login:     as the caller gave it (pass it to directory.set_suspended).
    metric:    "recipients_per_hour" or "messages_per_hour".
    count:     the login's count in the last hour, including the message just recorded.
    threshold: the configured breaker value that was crossed.
    at:        when it tripped (UTC).
    """

    login: str
    metric: str
    count: int
    threshold: int
    at: datetime

    @property
    def reason(self) -> str:
        """For the ALERT log line and the snapshot: 'recipients_per_hour=1001>1000'."""
        return f"{self.metric}={self.count}>{self.threshold}"


@dataclass(frozen=True, slots=True)
class _Exceeded:
    scope: str
    key: str
    metric: str
    maximum: int
    count: int

    @property
    def name(self) -> str:
        return f"{self.scope}_{self.metric}"

    def reply(self) -> replies.Reply:
        what = _WHAT[self.scope]
        if self.metric == "recipients_per_message":
            return replies.rate_limited(
                f"Too many recipients in one message for this {what} (limit {self.maximum});"
                " send the rest in another message"
            )
        noun = "messages" if self.metric == "messages_per_hour" else "recipients"
        return replies.rate_limited(
            f"Too many {noun} per hour from this {what} (limit {self.maximum}),"
            " please try again later"
        )


class Limits:
    """The rate limiter of one server process. All methods are synchronous and quick.

    `now` is the clock of the windows (seconds, never going backwards); `wall` gives the UTC
    times written into snapshots and trips. Both are injectable so tests need no sleeping.
    """

    def __init__(
        self,
        cfg: RateLimitsConfig,
        backend: Backend | None = None,
        now: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.cfg = cfg
        self.backend: Backend = backend if backend is not None else MemoryBackend()
        self._now = now
        self._wall = wall
        # One lock around counters, hits and trips: the asyncio sessions call from one thread,
        # but a snapshot may be built from a worker thread.
        self._lock = threading.RLock()
        self._hits: dict[tuple[str, str], list[int]] = {}  # (service, name) -> [refused, shadow]
        self._tripped: dict[str, BreakerTrip] = {}  # login key -> its live trip
        self._trips: deque[BreakerTrip] = deque(maxlen=50)  # recent trips, for the report

    # --- configuration ---------------------------------------------------------------

    def limit(self, service: str, name: str) -> int:
        """The value of limit `name` on `service` (0: no limit); an override wins."""
        override = getattr(self._override(service), name) if name in RATE_LIMIT_NAMES else None
        if override is not None:
            return int(override)
        value: int = getattr(self.cfg, name)
        return value

    def is_shadow(self, service: str, name: str) -> bool:
        """True when limit `name` only logs on `service`."""
        override = self._override(service)
        shadow = override.shadow if override is not None else None
        return name in (shadow if shadow is not None else self.cfg.shadow)

    def _override(self, service: str) -> ServiceRateLimits | None:
        if service not in SERVICES:
            return None
        override: ServiceRateLimits = getattr(self.cfg, service)
        return override

    # --- the checks ----------------------------------------------------------------

    def check_recipient(
        self, *, service: str, login: str | None, ip: str, rcpt_in_message: int
    ) -> None:
        """At RCPT, before answering 250: raise Rejected(450 4.7.1) if a limit is exceeded.

        rcpt_in_message: this recipient's position among the transaction's accepted
        recipients (1 for the first), so the hourly recipient limits count it and those
        accepted before it. The message itself counts toward messages_per_hour.
        """
        self._check(service, login, ip, nrcpt=rcpt_in_message)

    def check_message(self, *, service: str, login: str | None, ip: str, nrcpt: int) -> None:
        """At DATA (or end of data), before accepting: the same limits for the whole message.

        Other sessions may have sent mail since the RCPTs were checked, so this can refuse
        a message whose recipients were all accepted.
        """
        self._check(service, login, ip, nrcpt=nrcpt)

    def record_message(
        self, *, service: str, login: str | None, ip: str, nrcpt: int
    ) -> BreakerTrip | None:
        """After the 250: count the message. Returns a trip the first time the login crosses a
        breaker threshold (then None again until it has fallen back below it)."""
        with self._lock:
            now = self._now()
            counts: dict[str, int] = {}
            for scope, key in self._subjects(service, login, ip):
                counts[f"{scope}_messages_per_hour"] = self.backend.add(
                    _counter_key("msg", scope, key), 1, now
                )
                counts[f"{scope}_recipients_per_hour"] = self.backend.add(
                    _counter_key("rcpt", scope, key), max(nrcpt, 0), now
                )
            if not login:
                return None
            return self._breaker(login, counts, now)

    def _check(self, service: str, login: str | None, ip: str, *, nrcpt: int) -> None:
        with self._lock:
            now = self._now()
            trip = self._live_trip(login_key(login), now) if login else None
            self.decide(service, login, ip, nrcpt=nrcpt, trip=trip,
                        count=lambda key: self.backend.count(key, now))  # fmt: skip

    def counter_keys(self, service: str, login: str | None, ip: str) -> list[str]:
        """The hourly counters a message from (service, login, ip) is counted in, in the order
        `decide` and `crossing` read them; a shared store (limits.shared) keeps them."""
        return [
            _counter_key(counter, scope, key)
            for scope, key in self._subjects(service, login, ip)
            for counter in ("msg", "rcpt")
        ]

    def named_counts(
        self, service: str, login: str | None, ip: str, totals: list[int]
    ) -> dict[str, int]:
        """{limit name: count} from the totals of `counter_keys`, in that order (for
        `crossing`)."""
        names = [
            f"{scope}_{metric}"
            for scope, _ in self._subjects(service, login, ip)
            for metric in ("messages_per_hour", "recipients_per_hour")
        ]
        return dict(zip(names, totals, strict=True))

    def decide(
        self,
        service: str,
        login: str | None,
        ip: str,
        *,
        nrcpt: int,
        trip: BreakerTrip | None,
        count: Callable[[str], int],
    ) -> None:
        """The rule for every check: raise Rejected(450 4.7.1) when the login's breaker trip is
        live or an enforced limit is exceeded, given each counter's count (`count(key)`, keys
        from `counter_keys`) in the window that ends now; shadow limits only log."""
        with self._lock:
            if login and trip is not None:
                self._count_hit(service, "breaker", shadow=False)
                raise Rejected(
                    replies.rate_limited(
                        "Sending from this account is suspended, contact the postmaster"
                    ),
                    reason=f"ratelimit breaker login={printable(login)} {trip.reason}",
                )
            if in_networks(ip, self.cfg.exempt_networks):
                return
            refusal: _Exceeded | None = None
            for exceeded in self._exceeded(service, login, ip, nrcpt, count):
                if self.is_shadow(service, exceeded.name):
                    self._count_hit(service, exceeded.name, shadow=True)
                    log.info(
                        "ratelimit shadow would_limit key=%s:%s limit=%s max=%d count=%d "
                        "service=%s",
                        exceeded.scope,
                        printable(exceeded.key),
                        exceeded.name,
                        exceeded.maximum,
                        exceeded.count,
                        service,
                    )
                elif refusal is None:
                    refusal = exceeded
            if refusal is None:
                return
            self._count_hit(service, refusal.name, shadow=False)
            reason = (
                f"ratelimit limited key={refusal.scope}:{printable(refusal.key)} "
                f"limit={refusal.name} max={refusal.maximum} count={refusal.count} "
                f"service={service}"
            )
            log.warning("%s", reason)
            raise Rejected(refusal.reply(), reason=reason)

    def _exceeded(
        self, service: str, login: str | None, ip: str, nrcpt: int, count_of: Callable[[str], int]
    ) -> list[_Exceeded]:
        found = []
        for scope, key in self._subjects(service, login, ip):
            for metric in _METRICS:
                maximum = self.limit(service, f"{scope}_{metric}")
                if maximum == 0:
                    continue
                if metric == "recipients_per_message":
                    count = nrcpt
                elif metric == "messages_per_hour":
                    count = count_of(_counter_key("msg", scope, key)) + 1
                else:
                    count = count_of(_counter_key("rcpt", scope, key)) + nrcpt
                if count > maximum:
                    found.append(_Exceeded(scope, key, metric, maximum, count))
        return found

    def _subjects(self, service: str, login: str | None, ip: str) -> list[tuple[str, str]]:
        """(scope, key) pairs in `_SCOPES` order; no login scope without a login."""
        subjects = []
        if login:
            subjects.append(("login", login_key(login)))
        subjects.append(("ip", network_key(ip, self.cfg.ipv4_prefix, self.cfg.ipv6_prefix)))
        subjects.append(("service", service))
        return subjects

    def _count_hit(self, service: str, name: str, *, shadow: bool) -> None:
        counts = self._hits.setdefault((service, name), [0, 0])
        counts[1 if shadow else 0] += 1
        metrics.RATELIMIT.labels(service, name, "shadow" if shadow else "refused").inc()

    # --- the breaker -----------------------------------------------------------------

    def _thresholds(self) -> tuple[tuple[str, int], ...]:
        return (
            ("recipients_per_hour", self.cfg.breaker_recipients_per_hour),
            ("messages_per_hour", self.cfg.breaker_messages_per_hour),
        )

    def _breaker(self, login: str, counts: dict[str, int], now: float) -> BreakerTrip | None:
        key = login_key(login)
        if self._live_trip(key, now) is not None:
            return None  # already reported
        trip = self.crossing(login, counts)
        if trip is not None:
            self._tripped[key] = trip
            self.note_trip(trip)
        return trip

    def crossing(self, login: str, counts: dict[str, int]) -> BreakerTrip | None:
        """The trip `login` makes with these counts after recording a message ({limit name:
        count}, e.g. "login_recipients_per_hour"), or None: the breaker's one rule."""
        for metric, threshold in self._thresholds():
            count = counts.get(f"login_{metric}", 0)
            if threshold and count > threshold:
                return BreakerTrip(login, metric, count, threshold, self._wall())
        return None

    def note_trip(self, trip: BreakerTrip) -> None:
        """Remember a trip for the report and raise the ALERT (once per trip, cluster-wide
        when the counters are shared: only the node that won the trip calls this)."""
        with self._lock:
            self._trips.append(trip)
        log.critical(
            "ALERT ratelimit breaker tripped login=%s reason=%s", printable(trip.login), trip.reason
        )

    def _live_trip(self, key: str, now: float) -> BreakerTrip | None:
        """The login's trip while its count is still over the threshold that tripped it."""
        trip = self._tripped.get(key)
        if trip is None:
            return None
        counter = _COUNTERS[trip.metric]
        if self.backend.count(_counter_key(counter, "login", key), now) > trip.threshold:
            return trip
        del self._tripped[key]  # re-armed: it may trip (and be reported) again
        return None

    # --- the snapshot ------------------------------------------------------------------

    def snapshot(self, top: int = TOP) -> dict[str, Any]:
        """Counters, limits and hits as JSON-ready data for `mailgate limits report`.

        {"version": 1, "written_at": ISO-8601 UTC, "window_seconds": 3600,
         "limits": {name: {"scope", "metric", "services": {service: {"max", "shadow",
                    "refused", "would_refuse"}}, "top": [{"key", "count"}] (hourly only)}},
         "breaker": {"recipients_per_hour", "messages_per_hour", "refused",
                     "tripped": [{"login", "reason", "at", "active"}]}}
        Hit counts are since this process started; counts cover the last hour.
        """
        with self._lock:
            now = self._now()
            self.backend.prune(now)
            services = list(SERVICES) + sorted({svc for svc, _ in self._hits} - set(SERVICES))
            limits: dict[str, Any] = {}
            for name in RATE_LIMIT_NAMES:
                scope, metric = name.split("_", 1)
                entry: dict[str, Any] = {"scope": scope, "metric": metric, "services": {}}
                for svc in services:
                    refused, shadow = self._hits.get((svc, name), [0, 0])
                    entry["services"][svc] = {
                        "max": self.limit(svc, name),
                        "shadow": self.is_shadow(svc, name),
                        "refused": refused,
                        "would_refuse": shadow,
                    }
                if metric in _COUNTERS:
                    prefix = _counter_key(_COUNTERS[metric], scope, "")
                    entry["top"] = [
                        {"key": key.removeprefix(prefix), "count": count}
                        for key, count in self.backend.top(prefix, top, now)
                    ]
                limits[name] = entry
            breaker = {
                "recipients_per_hour": self.cfg.breaker_recipients_per_hour,
                "messages_per_hour": self.cfg.breaker_messages_per_hour,
                "refused": sum(self._hits.get((svc, "breaker"), [0, 0])[0] for svc in services),
                "tripped": [
                    {
                        "login": trip.login,
                        "reason": trip.reason,
                        "at": trip.at.isoformat(),
                        "active": self._live_trip(login_key(trip.login), now) is trip,
                    }
                    for trip in self._trips
                ],
            }
            return {
                "version": SNAPSHOT_VERSION,
                "written_at": self._wall().astimezone(UTC).isoformat(),
                "window_seconds": HOUR,
                "limits": limits,
                "breaker": breaker,
            }

    def write_snapshot(self, path: Path, *, extra: dict[str, Any] | None = None) -> None:
        """Atomically replace `path` (normally <spool>/limits.json) with `snapshot()`, merged
        with `extra` (e.g. {"auth": guard.snapshot()}). Blocking file I/O: from asyncio, call
        it through asyncio.to_thread."""
        from mailgate.limits.snapshot import write_snapshot

        data = self.snapshot()
        if extra:
            data.update(extra)
        write_snapshot(path, data)


def trip_counter_key(trip: BreakerTrip) -> str:
    """The counter whose count keeps `trip` live (its count must stay over the threshold)."""
    return _counter_key(_COUNTERS[trip.metric], "login", login_key(trip.login))


def _counter_key(counter: str, scope: str, key: str) -> str:
    return f"{counter}|{scope}|{key}"

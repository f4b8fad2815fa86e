"""Every Prometheus metric mailgate exports, defined once (INTERFACE.md part 2, "Web").

Owns: the metric objects, the multiprocess set-up of `mailgate serve` and the rendering of
`/metrics`. Call sites count with one line (`metrics.ACCEPTED.labels(service).inc()`); nothing
here knows about SMTP, the spool or delivery. Must not: import anything from mailgate.

Several processes: `mailgate serve` forks listener workers and runs the delivery engine in the
supervisor. prometheus-client's multiprocess mode gives each process its own memory-mapped
files in one per-run directory, named by $PROMETHEUS_MULTIPROC_DIR, which `cli serve` sets
(and empties) before this module is imported and before the fork: the library picks a value's
storage when the value is created. `/metrics` sums them (`MultiProcessCollector`), so a
counter moves by exactly the messages of every worker, and a restarted worker's counts are
kept. Values that are a snapshot of the supervisor's own state (the queue) are collected at
scrape time instead, by a collector the supervisor passes to `render()`.

Every metric has labels: its values are then created at first use, after `cli serve` chose
the multiprocess storage, whatever imported this module earlier (tests/unit/test_metrics.py).
Names follow Prometheus conventions: `_total` counters, `_seconds` histograms, base units.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Self, TypeVar

import prometheus_client
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

_M = TypeVar("_M", bound=MetricWrapperBase)


# labels() remembers the child it returned for each tuple of values: the call sites run it
# several times per message (issue #19), and prometheus-client's own look-up checks the names,
# converts every value with str() and takes a lock on every call. The library keeps each child
# for the life of the process anyway (nothing here removes one), so the same object comes back.
class Counter(prometheus_client.Counter):
    def labels(self, *labelvalues: object, **labelkwargs: object) -> Self:
        return _child(self, super().labels, labelvalues, labelkwargs)


class Gauge(prometheus_client.Gauge):
    def labels(self, *labelvalues: object, **labelkwargs: object) -> Self:
        return _child(self, super().labels, labelvalues, labelkwargs)


class Histogram(prometheus_client.Histogram):
    def labels(self, *labelvalues: object, **labelkwargs: object) -> Self:
        return _child(self, super().labels, labelvalues, labelkwargs)


def _child(
    metric: _M,
    make: Callable[..., _M],
    labelvalues: tuple[object, ...],
    labelkwargs: dict[str, object],
) -> _M:
    if labelkwargs:
        return make(*labelvalues, **labelkwargs)
    children: dict[tuple[object, ...], _M] = metric.__dict__.setdefault("_mailgate_children", {})
    child = children.get(labelvalues)
    if child is None:
        child = children[labelvalues] = make(*labelvalues)
    return child


MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own name for the directory

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# From acceptance to the final outcome: seconds for most mail, days for a deferred message.
_DELAY_BUCKETS = (1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0, 5 * 86400.0)

# --- receiving -------------------------------------------------------------------------------
CONNECTIONS = Counter("mailgate_connections_total", "Connections accepted", ["service"])
CONNECTIONS_REFUSED = Counter(
    "mailgate_connections_refused_total",
    "Connections refused before the greeting (limits, AUTH lock-out)",
    ["service", "reason"],
)
SESSIONS = Gauge(
    "mailgate_sessions", "SMTP sessions open now", ["service"], multiprocess_mode="livesum"
)
ACCEPTED = Counter(
    "mailgate_messages_accepted_total", "Messages accepted (on disk, 250 sent)", ["service"]
)
REFUSED = Counter(
    "mailgate_messages_refused_total",
    "Transactions, recipients or messages refused by policy, limits, scanning or the spool",
    ["service", "code"],
)
ACCEPT_SECONDS = Histogram(
    "mailgate_accept_duration_seconds",
    "From the end of DATA to the reply (scan, stamp, sign, fsync)",
    ["service"],
    buckets=_LATENCY_BUCKETS,
)
AUTH_FAILURES = Counter("mailgate_auth_failures_total", "Failed AUTH attempts", ["service"])
AUTH_DEFENCE = Counter(
    "mailgate_auth_defence_events_total",
    "AUTH guard actions: delayed, refused (454), locked_out (421 at connect), banned (kernel)",
    ["action"],
)
RATELIMIT = Counter(
    "mailgate_ratelimit_events_total",
    "Rate-limit hits: mode=refused (450 4.7.1 given) or shadow (would have refused)",
    ["service", "limit", "mode"],
)
SUSPENSIONS = Counter(
    "mailgate_accounts_suspended_total",
    "Logins suspended by the compromised-account breaker",
    ["service"],
)

# --- scanning ----------------------------------------------------------------------------------
SCAN_VERDICTS = Counter(
    "mailgate_scan_verdicts_total",
    "Scanner verdicts: clean, virus, blocked, badmime, toobig, unavailable",
    ["verdict"],
)
SCAN_SECONDS = Histogram(
    "mailgate_scan_duration_seconds", "Scanning one message", ["verdict"], buckets=_LATENCY_BUCKETS
)

# --- delivery ----------------------------------------------------------------------------------
DELIVERIES = Counter(
    "mailgate_deliveries_total",
    "Outcomes per recipient: delivered, deferred, bounced",
    ["status"],
)
DELIVERY_TLS = Counter(
    "mailgate_delivery_tls_total",
    "Delivered recipients by transport security (tls=yes|no, verified=yes|no)",
    ["tls", "verified"],
)
ATTEMPT_SECONDS = Histogram(
    "mailgate_delivery_attempt_duration_seconds",
    "One SMTP transaction to a remote host, from MAIL to the reply to the final dot, by the"
    " first recipient's result (delivered, deferred, failed)",
    ["status"],
    buckets=_LATENCY_BUCKETS,
)
DELIVERY_DELAY = Histogram(
    "mailgate_delivery_delay_seconds",
    "From acceptance to the final outcome of a recipient (delivered or bounced)",
    ["status"],
    buckets=_DELAY_BUCKETS,
)
DSNS = Counter("mailgate_dsn_total", "Delivery status notifications queued", ["action"])

# --- operating ---------------------------------------------------------------------------------
RELOADS = Counter("mailgate_reloads_total", "Configuration reloads", ["result"])


def process_died(pid: int) -> None:
    """A worker exited: its `livesum` gauges (open sessions) stop counting; counters stay."""
    if MULTIPROCESS_ENV in os.environ:
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call] # untyped library


def render(extra: Iterable[Collector] = ()) -> tuple[bytes, str]:
    """The `/metrics` body and its content type: every process's metrics, plus `extra`."""
    registry = CollectorRegistry()
    path = os.environ.get(MULTIPROCESS_ENV)
    if path:
        multiprocess.MultiProcessCollector(registry, path)  # type: ignore[no-untyped-call]
    else:  # one process (tests, tools): the default registry
        registry.register(_Default())
    for collector in extra:
        registry.register(collector)
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _Default(Collector):
    def collect(self) -> Iterator[Metric]:
        return iter(REGISTRY.collect())

"""Retry maths for the delivery engine: when to try again, when to give up, when to warn.

Owns: the pure functions that turn (arrival time, attempts so far, now, config) into the next
attempt time, the expiry time and the delay-warning decision. Must not: read the clock, touch
the spool or the network; randomness comes in as an argument so tests can fix it.

The defaults follow the spirit of Postfix and Exim (RFC 5321 §4.5.4.1: "the retry interval
SHOULD be at least 30 minutes", with an earlier first retry for transient greylisting): first
retry after 5 minutes, backing off to 4 hours, give up after 5 days (RFC 5321 §4.5.4.1 "at
least 4-5 days"), warn the sender once after 4 hours.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import datetime, timedelta

DEFAULT_SCHEDULE: tuple[int, ...] = (300, 900, 1800, 3600, 7200, 14400)
DEFAULT_LIFETIME = timedelta(days=5)
# ±10 %: enough that entries deferred together (a restart, an outage of one big MX) come back
# spread out instead of as one burst, small enough that the schedule stays recognisable.
JITTER = 0.10


def expires_at(received_at: datetime, max_lifetime: timedelta) -> datetime:
    """The moment after which a still-deferred recipient is given up (RFC 3464 status 4.4.7)."""
    return received_at + max_lifetime


def retry_delay(attempts: int, schedule: Sequence[int] = DEFAULT_SCHEDULE) -> timedelta:
    """The un-jittered wait after the `attempts`-th failed try; the last step repeats."""
    if not schedule:
        raise ValueError("empty retry schedule")
    index = min(max(attempts, 1), len(schedule)) - 1
    return timedelta(seconds=schedule[index])


def next_attempt_at(
    first_seen: datetime,
    attempts: int,
    rng: random.Random,
    *,
    now: datetime,
    schedule: Sequence[int] = DEFAULT_SCHEDULE,
    max_lifetime: timedelta = DEFAULT_LIFETIME,
    jitter: float = JITTER,
) -> datetime | None:
    """When to try again after `attempts` failed tries, or None when it is time to give up.

    Giving up happens only once `now` has reached the expiry; otherwise the next try is never
    scheduled after the expiry, so that the last try happens at it (Postfix does the same with
    maximal_queue_lifetime), and the recipient is failed if that try defers too.
    """
    deadline = expires_at(first_seen, max_lifetime)
    if now >= deadline:
        return None
    base = retry_delay(attempts, schedule).total_seconds()
    wait = base * (1.0 + rng.uniform(-jitter, jitter))
    return min(now + timedelta(seconds=wait), deadline)


def is_delay_warning_due(
    received_at: datetime,
    warned_at: datetime | None,
    *,
    now: datetime,
    delay_warning_after: timedelta,
) -> bool:
    """A delay warning (RFC 3464 Action: delayed) is sent once, after `delay_warning_after`.

    A zero `delay_warning_after` disables warnings, as Postfix's delay_warning_time = 0 does.
    """
    if warned_at is not None or delay_warning_after <= timedelta(0):
        return False
    return now - received_at >= delay_warning_after

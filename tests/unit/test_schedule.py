"""deliver/schedule.py: retry times, expiry and delay warnings, as tables (no clock, no I/O)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from mailgate.deliver import schedule

T0 = datetime(2024, 1, 1, tzinfo=UTC)
STEPS = (300, 900, 1800, 3600, 7200, 14400)


@pytest.mark.parametrize(
    ("attempts", "seconds"),
    [(0, 300), (1, 300), (2, 900), (3, 1800), (4, 3600), (5, 7200), (6, 14400), (7, 14400),
     (100, 14400)],
)  # fmt: skip
def test_retry_delay_follows_the_schedule_and_repeats_the_last_step(
    attempts: int, seconds: int
) -> None:
    assert schedule.retry_delay(attempts, STEPS) == timedelta(seconds=seconds)


def test_defaults_are_minutes_then_hours() -> None:
    assert schedule.DEFAULT_SCHEDULE[0] <= 600
    assert schedule.DEFAULT_SCHEDULE[-1] >= 3600
    lifetime = schedule.DEFAULT_LIFETIME
    assert lifetime == timedelta(days=5)


@pytest.mark.parametrize("attempts", [1, 2, 3, 6, 9])
def test_next_attempt_is_jittered_within_ten_percent(attempts: int) -> None:
    rng = random.Random(attempts)
    now = T0 + timedelta(minutes=1)
    base = schedule.retry_delay(attempts, STEPS)
    seen = set()
    for _ in range(200):
        when = schedule.next_attempt_at(T0, attempts, rng, now=now, schedule=STEPS)
        assert when is not None
        assert base * 0.9 <= when - now <= base * 1.1
        seen.add(when)
    assert len(seen) > 100  # really spread, not one value


@pytest.mark.parametrize(
    ("age", "expected"),
    [
        (timedelta(days=5), None),  # exactly at the lifetime: give up
        (timedelta(days=6), None),
        (timedelta(days=5) - timedelta(minutes=1), T0 + timedelta(days=5)),  # last try at expiry
    ],
)
def test_give_up_at_the_lifetime_and_never_schedule_past_it(
    age: timedelta, expected: datetime | None
) -> None:
    rng = random.Random(0)
    when = schedule.next_attempt_at(T0, 6, rng, now=T0 + age, schedule=STEPS)
    assert when == expected


def test_short_lifetime_from_config() -> None:
    rng = random.Random(0)
    life = timedelta(seconds=600)
    assert schedule.next_attempt_at(T0, 1, rng, now=T0 + timedelta(seconds=601),
                                    schedule=(60,), max_lifetime=life) is None  # fmt: skip
    when = schedule.next_attempt_at(T0, 1, rng, now=T0, schedule=(60,), max_lifetime=life)
    assert when is not None and when - T0 <= timedelta(seconds=66)


@pytest.mark.parametrize(
    ("age", "warned", "after", "due"),
    [
        (timedelta(hours=3), False, timedelta(hours=4), False),
        (timedelta(hours=4), False, timedelta(hours=4), True),
        (timedelta(hours=5), False, timedelta(hours=4), True),
        (timedelta(hours=5), True, timedelta(hours=4), False),  # once only
        (timedelta(days=1), False, timedelta(0), False),  # 0 disables warnings
    ],
)
def test_delay_warning(age: timedelta, warned: bool, after: timedelta, due: bool) -> None:
    warned_at = T0 + timedelta(hours=1) if warned else None
    assert (
        schedule.is_delay_warning_due(T0, warned_at, now=T0 + age, delay_warning_after=after) is due
    )


def test_empty_schedule_is_a_bug() -> None:
    with pytest.raises(ValueError):
        schedule.retry_delay(1, ())

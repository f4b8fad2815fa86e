"""Waiting for a condition, with a bounded timeout: the one poll loop of the test suite.

Owns: `wait_for` (blocking) and `wait_for_async` (for a test whose event loop must keep
running meanwhile). Tests never sleep to synchronise; they poll a condition and fail with a
TimeoutError naming what they waited for when it does not come true in time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

INTERVAL = 0.01  # between two looks at the condition; short, as it only bounds the latency


def wait_for(
    condition: Callable[[], T | None],
    timeout: float = 10.0,
    interval: float = INTERVAL,
    what: str = "",
) -> T:
    """Call `condition()` until it returns a truthy value (returned) or `timeout` seconds pass
    (TimeoutError). The condition is always tried once more after the deadline."""
    deadline = time.monotonic() + timeout
    while True:  # bounded by the deadline
        expired = time.monotonic() > deadline
        value = condition()
        if value:
            return value
        if expired:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what or condition}")
        time.sleep(interval)  # the poll interval of a bounded wait, not a synchronisation


async def wait_for_async(
    condition: Callable[[], T | None],
    timeout: float = 10.0,
    interval: float = INTERVAL,
    what: str = "",
) -> T:
    """Like `wait_for`, sleeping on the running event loop between two looks."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:  # bounded by the deadline
        expired = loop.time() > deadline
        value = condition()
        if value:
            return value
        if expired:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what or condition}")
        await asyncio.sleep(interval)

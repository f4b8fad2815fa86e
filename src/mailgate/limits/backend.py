"""Where rate-limit counters live: the `Backend` protocol and the in-memory implementation.

Owns: sliding-window event counters keyed by strings. A window of `window` seconds is cut into
`buckets` equal buckets; a count is the sum of the buckets that overlap the last `window`
seconds, so with the defaults (3600 s, 60 buckets) a count covers the last 59 to 60 minutes and
each key costs at most 60 small integers. Must not: know what a key means (that is
`limits.rate`), read the clock itself (the caller passes `now`), or do any I/O.

The same windows in Redis, shared by every process, are limits.shared (one hash per key, a field
per bucket, on the Redis server's clock).
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
from collections import OrderedDict, deque
from typing import Protocol

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 3600.0
DEFAULT_BUCKETS = 60
DEFAULT_MAX_KEYS = 200_000


class Backend(Protocol):
    """Sliding-window counters. `now` is in seconds on any clock that never goes backwards."""

    def add(self, key: str, amount: int, now: float) -> int:
        """Record `amount` events for `key` at `now`; return the key's count in the window."""
        ...

    def count(self, key: str, now: float) -> int:
        """The number of events for `key` in the window that ends at `now`."""
        ...

    def top(self, prefix: str, n: int, now: float) -> list[tuple[str, int]]:
        """Up to `n` (key, count) pairs with the highest counts among keys starting with
        `prefix`, highest first (ties by key); keys with a zero count are left out."""
        ...

    def prune(self, now: float) -> int:
        """Forget keys whose count has fallen to zero; return how many were forgotten."""
        ...


class _Window:
    """One key's buckets: (bucket index, count) oldest first, and their running total."""

    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets: deque[list[int]] = deque()
        self.total = 0

    def expire(self, oldest: int) -> None:
        # Bounded: each bucket is appended once and popped at most once.
        while self.buckets and self.buckets[0][0] < oldest:
            self.total -= self.buckets.popleft()[1]

    def add(self, index: int, amount: int) -> None:
        if self.buckets and self.buckets[-1][0] >= index:
            # Same bucket (or a clock that stepped back a little): fold into the newest.
            self.buckets[-1][1] += amount
        else:
            self.buckets.append([index, amount])
        self.total += amount


class MemoryBackend:
    """Counters in this process's memory; lost on restart (a rate limit can afford that).

    At most `max_keys` keys are kept; when a new key would exceed that, keys that have fallen
    the least recently updated key is forgotten (if it was still counting, its sender is then
    under-counted: failing open is better than unbounded memory). `prune()` drops expired keys.
    Thread-safe, so a snapshot may be taken from a worker thread.
    """

    def __init__(
        self,
        *,
        window: float = DEFAULT_WINDOW,
        buckets: int = DEFAULT_BUCKETS,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        if window <= 0 or buckets < 1 or max_keys < 1:
            raise ValueError("window, buckets and max_keys must be positive")
        self.window = window
        self.buckets = buckets
        self.max_keys = max_keys
        self._width = window / buckets
        self._keys: OrderedDict[str, _Window] = OrderedDict()
        self._lock = threading.Lock()
        self._has_warned_full = False

    def _index(self, now: float) -> int:
        return math.floor(now / self._width)

    def add(self, key: str, amount: int, now: float) -> int:
        if amount < 0:
            raise ValueError("amount must not be negative")
        index = self._index(now)
        with self._lock:
            window = self._keys.get(key)
            if window is None:
                if len(self._keys) >= self.max_keys:
                    self._make_room(index)
                window = self._keys[key] = _Window()
            else:
                self._keys.move_to_end(key)
            window.expire(index - self.buckets + 1)
            window.add(index, amount)
            return window.total

    def count(self, key: str, now: float) -> int:
        with self._lock:
            window = self._keys.get(key)
            if window is None:
                return 0
            window.expire(self._index(now) - self.buckets + 1)
            return window.total

    def top(self, prefix: str, n: int, now: float) -> list[tuple[str, int]]:
        oldest = self._index(now) - self.buckets + 1
        with self._lock:
            pairs = []
            for key, window in self._keys.items():
                if key.startswith(prefix):
                    window.expire(oldest)
                    if window.total > 0:
                        pairs.append((key, window.total))
        return heapq.nsmallest(n, pairs, key=lambda kv: (-kv[1], kv[0]))

    def prune(self, now: float) -> int:
        with self._lock:
            return self._prune(self._index(now))

    def __len__(self) -> int:
        return len(self._keys)

    def _prune(self, index: int) -> int:
        oldest = index - self.buckets + 1
        dead = []
        for key, window in self._keys.items():
            window.expire(oldest)
            if window.total <= 0:
                dead.append(key)
        for key in dead:
            del self._keys[key]
        return len(dead)

    def _make_room(self, index: int) -> None:
        # O(1): the least recently updated key is the most likely to have expired anyway; a
        # full prune here would cost O(keys) per new key while someone floods us with keys.
        _, window = self._keys.popitem(last=False)
        window.expire(index - self.buckets + 1)
        if window.total > 0 and not self._has_warned_full:
            self._has_warned_full = True
            log.warning("ratelimit backend full max_keys=%d forgetting live keys", self.max_keys)

"""The counters of every worker and node in one Redis (`[state] url`, INTERFACE.md part 2).

Owns: the Redis connection and one server-side Lua script per counter kind, each run atomically
by Redis, so a burst of connections spread over many workers and nodes is counted exactly:

- rate counters (`rate`): an hourly window cut into buckets, one hash per counter (a field per
  bucket); adding 0 reads. The breaker's trip is one key per login set with SET NX, so only one
  process in the cluster wins it (and suspends the account and raises the ALERT).
- AUTH failures (`auth_begin`, `auth_end`, `auth_client`): a sorted set per client and per login
  (member "OTHER-SIDE|ATTEMPT-ID", score the time), trimmed to the depth that can matter; the
  trusted (login, client) pairs as keys with an expiry; attempts in flight as sorted sets whose
  scores are expiry times, so a worker that dies mid-attempt does not leave them raised.
- connections per client address (`conn_open`, `conn_close`): a hash per address with a field per
  process, counted only while that process's heartbeat key lives (a dead process stops counting
  within `HEARTBEAT_TTL` seconds).

Every window is on the Redis server's clock (TIME inside the scripts): one clock for the whole
cluster, whatever the nodes' clocks say. Must not: decide anything (limits.rate and
limits.authguard hold the rules; limits.counters asks them), or hide a failure: every Redis
error becomes `StateUnavailable`, and after one the store is not asked again for
`RETRY_AFTER` seconds, so a dead Redis costs each session nothing but a comparison.

The scripts touch keys of one prefix and, for connections, heartbeat keys they find in a hash:
they need one Redis (with replicas or Sentinel if wanted), not Redis Cluster.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

T = TypeVar("T")

TIMEOUT = 1.0  # seconds for one command (connecting included): a session waits at most this
RETRY_AFTER = 2.0  # seconds without asking Redis after a failure
WARN_INTERVAL = 60.0  # one warning line a minute while Redis is unreachable
HEARTBEAT_TTL = 60  # seconds a process's connections count after its last heartbeat
HEARTBEAT_INTERVAL = 20.0
CONNECTION_TTL = 86400  # a per-address hash nobody touched for a day is dropped

# KEYS[1]: the trip key (read only); KEYS[2..]: rate counters.
# ARGV: bucket width (s), buckets, ttl (s), then one amount per counter.
# Returns {trip value or "", total of each counter in the window, after adding}.
_RATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local width, buckets, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local index = math.floor(now / width)
local oldest = index - buckets + 1
local out = {redis.call('GET', KEYS[1]) or ''}
for i = 2, #KEYS do
  local key = KEYS[i]
  local amount = tonumber(ARGV[2 + i])
  if amount > 0 then redis.call('HINCRBY', key, index, amount) end
  local total = 0
  local fields = redis.call('HGETALL', key)
  for j = 1, #fields, 2 do
    if tonumber(fields[j]) < oldest then
      redis.call('HDEL', key, fields[j])
    else
      total = total + tonumber(fields[j + 1])
    end
  end
  if amount > 0 then redis.call('EXPIRE', key, ttl) end
  out[i] = total
end
return out
"""

# KEYS: client failures, login failures, trusted pair, client in flight, login in flight.
# ARGV: window, depth, refuse_after, login_refuse_after, parallel_per_client,
#       parallel_per_login, exempt (0/1), attempt id, client, login, in-flight ttl.
# Returns {status, client failures, login failures} counted before this attempt; status is
# "refused" (not counted), "busy_client" / "busy_login" (counted, not in flight) or "ok"
# (counted and in flight until auth_end).
_AUTH_BEGIN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window, depth = tonumber(ARGV[1]), tonumber(ARGV[2])
local exempt = ARGV[7] == '1'
local id, client, login, ttl = ARGV[8], ARGV[9], ARGV[10], tonumber(ARGV[11])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
local trusted = redis.call('EXISTS', KEYS[3]) == 1
local nc, nl = 0, 0
if not exempt then nc = redis.call('ZCARD', KEYS[1]) end
if not trusted then nl = redis.call('ZCARD', KEYS[2]) end
if nc >= tonumber(ARGV[3]) or nl >= tonumber(ARGV[4]) then return {'refused', nc, nl} end
local keep = math.ceil(window) + 1
if not exempt then
  redis.call('ZADD', KEYS[1], now, login .. '|' .. id)
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(depth + 1))
  redis.call('EXPIRE', KEYS[1], keep)
end
redis.call('ZADD', KEYS[2], now, client .. '|' .. id)
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(depth + 1))
redis.call('EXPIRE', KEYS[2], keep)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
if not exempt and redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[5]) then
  return {'busy_client', nc, nl}
end
if not trusted and redis.call('ZCARD', KEYS[5]) >= tonumber(ARGV[6]) then
  return {'busy_login', nc, nl}
end
redis.call('ZADD', KEYS[4], now + ttl, id)
redis.call('ZADD', KEYS[5], now + ttl, id)
redis.call('EXPIRE', KEYS[4], math.ceil(ttl) + 1)
redis.call('EXPIRE', KEYS[5], math.ceil(ttl) + 1)
return {'ok', nc, nl}
"""

# KEYS: as _AUTH_BEGIN. ARGV: attempt id, client, login, outcome ("ok", "failed",
# "unverified"), trust period (s).
# ok: forget this pair's failures (the user's own typos) and trust the pair; unverified: take
# this attempt's count back; failed: it stays counted.
_AUTH_END = """
local id, client, login, outcome = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
redis.call('ZREM', KEYS[4], id)
redis.call('ZREM', KEYS[5], id)
local function forget(key, other)
  local prefix = other .. '|'
  for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    if string.sub(m, 1, #prefix) == prefix and not string.find(m, '|', #prefix + 1, true) then
      redis.call('ZREM', key, m)
    end
  end
end
if outcome == 'ok' then
  forget(KEYS[1], login)
  forget(KEYS[2], client)
  redis.call('SET', KEYS[3], '1', 'EX', math.ceil(tonumber(ARGV[5])))
elseif outcome == 'unverified' then
  redis.call('ZREM', KEYS[1], login .. '|' .. id)
  redis.call('ZREM', KEYS[2], client .. '|' .. id)
end
return 1
"""

# KEYS[1]: client failures. ARGV: window. Returns the count in the window.
_AUTH_CLIENT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
return redis.call('ZCARD', KEYS[1])
"""

# KEYS[1]: the address's hash. ARGV: heartbeat key prefix, this process, maximum, ttl,
# heartbeat ttl. Returns 1 (counted) or 0 (the address has `maximum` connections open in the
# cluster). Refreshes this process's heartbeat first, so its own connections always count.
_CONN_OPEN = """
redis.call('SET', ARGV[1] .. ARGV[2], '1', 'EX', ARGV[5])
local total = 0
local fields = redis.call('HGETALL', KEYS[1])
for j = 1, #fields, 2 do
  if redis.call('EXISTS', ARGV[1] .. fields[j]) == 1 then
    total = total + tonumber(fields[j + 1])
  else
    redis.call('HDEL', KEYS[1], fields[j])
  end
end
if total >= tonumber(ARGV[3]) then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS[1]: the address's hash. ARGV: this process.
_CONN_CLOSE = """
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
"""


class StateUnavailable(Exception):
    """Redis could not be asked (down, refused, timed out, or in its retry pause)."""


class SharedState:
    """One process's view of the shared counters. Make it inside the event loop that uses it."""

    def __init__(self, url: str, prefix: str, *, now: Callable[[], float] = time.monotonic):
        self.url = url
        self.prefix = prefix
        self.process = secrets.token_hex(8)  # this process, for connection counts
        self._now = now
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT,
            health_check_interval=30,
        )  # fmt: skip
        self._scripts = {
            name: self._redis.register_script(text)
            for name, text in (
                ("rate", _RATE),
                ("auth_begin", _AUTH_BEGIN),
                ("auth_end", _AUTH_END),
                ("auth_client", _AUTH_CLIENT),
                ("conn_open", _CONN_OPEN),
                ("conn_close", _CONN_CLOSE),
            )
        }
        self._retry_at = 0.0  # while now < this, Redis is not asked
        self._warn_at = 0.0  # the next warning line
        self.error = ""  # why Redis is unavailable; "" while it answers
        # Connections that closed while Redis was away, per address: limits.counters takes
        # them back once it answers (a reload makes new Counters over this same object).
        self.unclosed: Counter[str] = Counter()

    @property
    def is_available(self) -> bool:
        return not self.error

    def key(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}:{name}"

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        if self.error and self._now() < self._retry_at:
            raise StateUnavailable(self.error)
        try:
            result = await op()
        except (RedisError, OSError) as e:
            self._failed(e)
            raise StateUnavailable(self.error) from e
        if self.error:
            log.warning("state reachable again url=%s: shared counters resume", self._safe_url)
            self.error = ""
        return result

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        script = self._scripts[name]
        return await self._call(lambda: script(keys=keys, args=args))

    def _failed(self, e: BaseException) -> None:
        now = self._now()
        self.error = f"{type(e).__name__}: {e}".strip()[:300]
        self._retry_at = now + RETRY_AFTER
        if now >= self._warn_at:
            self._warn_at = now + WARN_INTERVAL
            log.warning("state unavailable url=%s counting per process: %s (logged once a minute)",
                        self._safe_url, self.error)  # fmt: skip

    @property
    def _safe_url(self) -> str:
        # redis://:PASSWORD@host: the password stays out of the log.
        scheme, sep, rest = self.url.partition("://")
        return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else self.url

    # --- rate counters and the breaker's trip ------------------------------------------

    async def rate(
        self, trip: str, counters: list[str], amounts: list[int], *, window: float, buckets: int
    ) -> tuple[str, list[int]]:
        """Add `amounts` to `counters` (0 reads) and return (the trip key's value or "", each
        counter's total in the window ending now)."""
        keys = [self.key("trip", trip)] + [self.key("rate", c) for c in counters]
        args: list[Any] = [window / buckets, buckets, int(window) + 60, *amounts]
        out = await self._script("rate", keys, args)
        value = out[0].decode() if isinstance(out[0], bytes) else str(out[0] or "")
        return value, [int(n) for n in out[1:]]

    async def trip_once(self, trip: str, value: str, ttl: float) -> bool:
        """Set the trip key unless set: True for the one caller in the cluster that set it."""
        key = self.key("trip", trip)
        return bool(await self._call(lambda: self._redis.set(key, value, nx=True, ex=int(ttl))))

    async def clear_trip(self, trip: str) -> None:
        key = self.key("trip", trip)
        await self._call(lambda: self._redis.delete(key))

    # --- AUTH --------------------------------------------------------------------------

    def _auth_keys(self, client: str, login: str) -> list[str]:
        return [
            self.key("authc", client),
            self.key("authl", login),
            self.key("trust", f"{login}|{client}"),
            self.key("inflc", client),
            self.key("infll", login),
        ]

    async def auth_begin(
        self, client: str, login: str, *, exempt: bool, limits: tuple[int, ...],
        window: float, depth: int, ttl: float,
    ) -> tuple[str, int, int, str]:  # fmt: skip
        """Count an attempt atomically. `limits`: (refuse_after, login_refuse_after,
        parallel_per_client, parallel_per_login). Returns (status, client failures, login
        failures, attempt id); see _AUTH_BEGIN."""
        attempt = secrets.token_hex(8)
        refuse, login_refuse, per_client, per_login = limits
        args: list[Any] = [window, depth, refuse, login_refuse, per_client, per_login,
                           1 if exempt else 0, attempt, client, login, ttl]  # fmt: skip
        out = await self._script("auth_begin", self._auth_keys(client, login), args)
        status = out[0].decode() if isinstance(out[0], bytes) else str(out[0])
        return status, int(out[1]), int(out[2]), attempt

    async def auth_end(
        self, client: str, login: str, attempt: str, outcome: str, trust_period: float
    ) -> None:
        """End an attempt `auth_begin` let through: outcome "ok", "failed" or "unverified"."""
        args: list[Any] = [attempt, client, login, outcome, trust_period]
        await self._script("auth_end", self._auth_keys(client, login), args)

    async def auth_client_failures(self, client: str, window: float) -> int:
        return int(await self._script("auth_client", [self.key("authc", client)], [window]))

    # --- connections per client address ------------------------------------------------

    async def heartbeat(self) -> None:
        """This process is alive: its connections count for HEARTBEAT_TTL seconds more."""
        key = self.key("proc", self.process)
        await self._call(lambda: self._redis.set(key, "1", ex=HEARTBEAT_TTL))

    async def conn_open(self, address: str, maximum: int) -> bool:
        """Count a connection from `address` unless it has `maximum` open in the cluster."""
        args: list[Any] = [self.key("proc", ""), self.process, maximum, CONNECTION_TTL,
                           HEARTBEAT_TTL]  # fmt: skip
        return bool(await self._script("conn_open", [self.key("conn", address)], args))

    async def conn_close(self, address: str) -> None:
        await self._script("conn_close", [self.key("conn", address)], [self.process])

    async def check(self) -> None:
        """PING Redis now (no retry pause: /readyz asks). Raises StateUnavailable naming the
        URL and the error; logs nothing (the counters' users log once a minute)."""
        try:
            await self._redis.ping()
        except (RedisError, OSError) as e:
            raise StateUnavailable(f"{self._safe_url}: {type(e).__name__}: {e}") from e

    async def close(self) -> None:
        await self._redis.aclose()

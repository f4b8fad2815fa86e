"""The counters of every worker and node in one Redis (`[state] url`, INTERFACE.md part 2).

Owns: the Redis connection and one server-side Lua script per counter kind, each run atomically
by Redis, so a burst of connections spread over many workers and nodes is counted exactly:

- rate counters (`rate`): an hourly window cut into buckets, one hash per counter (a field per
  bucket); adding 0 reads. The breaker's trip is one key per login set with SET NX, so only one
  process in the cluster wins it (and suspends the account and raises the ALERT).
- AUTH failures (`auth_begin`, `auth_end`; read at connect by `admit`): a sorted set per
  client and per login (member "OTHER-SIDE|ATTEMPT-ID", score the time), trimmed to the depth
  that can matter; the trusted (login, client) pairs as keys with an expiry; attempts in flight
  as sorted sets whose scores are expiry times, so a worker that dies mid-attempt does not
  leave them raised.
- connections per client address (`admit`, `conn_close`): a hash per address with a field per
  process, counted only while that process's heartbeat key lives (a dead process stops counting
  within `HEARTBEAT_TTL` seconds). `admit` also reads the client's AUTH failures, so a
  connection costs one round trip at connect whether or not the lock-out is checked.

Every window is on the Redis server's clock (TIME inside the scripts): one clock for the whole
cluster, whatever the nodes' clocks say. Must not: decide anything (limits.rate and
limits.authguard hold the rules; limits.counters asks them), or hide a failure: every Redis
error becomes `StateUnavailable`, and after one the store is not asked again for
`RETRY_AFTER` seconds, so a dead Redis costs each session nothing but a comparison.

The connection is our own (`_Pipe`, RESP2 over one asyncio connection per process): every
command a loop turn makes goes out in one write, answers are matched in order, and a command
costs about 20-30 us of client CPU against redis-py's 120-140 us (docs/PERFORMANCE.md, issue
#13). redis-py parses the URL (`redis://`, `rediss://`, `unix://`, user, password, db).
Commands whose answer nobody waits for (`auth_end`, `conn_close`) are sent without waiting.

The scripts touch keys of one prefix and, for connections, heartbeat keys they find in a hash:
they need one Redis (with replicas or Sentinel if wanted), not Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import ssl
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from redis.connection import parse_url

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

# KEYS[1]: the address's hash; KEYS[2]: the client's AUTH failures. ARGV: heartbeat key prefix,
# this process, maximum, ttl, heartbeat ttl, AUTH window (0: KEYS[2] is not read).
# Returns {1 (counted) or 0 (the address has `maximum` connections open in the cluster), the
# client's AUTH failures in the window (0 when not read)}. Refreshes this process's heartbeat
# first, so its own connections always count.
_ADMIT = """
redis.call('SET', ARGV[1] .. ARGV[2], '1', 'EX', ARGV[5])
local failures = 0
local window = tonumber(ARGV[6])
if window > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
  failures = redis.call('ZCARD', KEYS[2])
end
local total = 0
local fields = redis.call('HGETALL', KEYS[1])
for j = 1, #fields, 2 do
  if redis.call('EXISTS', ARGV[1] .. fields[j]) == 1 then
    total = total + tonumber(fields[j + 1])
  else
    redis.call('HDEL', KEYS[1], fields[j])
  end
end
if total >= tonumber(ARGV[3]) then return {0, failures} end
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {1, failures}
"""

# KEYS[1]: the address's hash. ARGV: this process, connections closed.
_CONN_CLOSE = """
if redis.call('HINCRBY', KEYS[1], ARGV[1], -tonumber(ARGV[2])) <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return 1
"""

_SCRIPTS = {
    "rate": _RATE,
    "auth_begin": _AUTH_BEGIN,
    "auth_end": _AUTH_END,
    "admit": _ADMIT,
    "conn_close": _CONN_CLOSE,
}


class ReplyError(Exception):
    """Redis answered a command with an error ("ERR ...", "NOSCRIPT ...", a script's error)."""


class _Incomplete(Exception):
    """The buffer ends inside a reply: wait for more bytes."""


def _encode(args: tuple[bytes | str | int | float, ...]) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int):
            data = b"%d" % arg
        else:
            data = repr(float(arg)).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


def _parse(buf: bytearray, pos: int) -> tuple[Any, int]:
    """The RESP2 reply that starts at `pos`, and where the next one starts. Raises _Incomplete,
    or ValueError for bytes that are not RESP."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind, line, pos = buf[pos], bytes(buf[pos + 1 : end]), end + 2
    if kind == 0x2B:  # +simple string
        return line, pos
    if kind == 0x2D:  # -error
        return ReplyError(line.decode(errors="replace")), pos
    if kind == 0x3A:  # :integer
        return int(line), pos
    if kind == 0x24:  # $bulk string
        n = int(line)
        if n < 0:
            return None, pos
        if len(buf) < pos + n + 2:
            raise _Incomplete
        return bytes(buf[pos : pos + n]), pos + n + 2
    if kind == 0x2A:  # *array
        n = int(line)
        if n < 0:
            return None, pos
        items = []
        for _ in range(n):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    raise ValueError(f"not a RESP reply: {bytes(buf[pos - len(line) - 3 : end])!r}")


class _Pipe(asyncio.Protocol):
    """One connection to Redis: commands pipelined, answers matched to them in order.

    Every command made in one turn of the event loop goes out in one write; a command that has
    no answer within TIMEOUT, a protocol error or a closed connection fails every command in
    flight (their callers count per process) and the next command opens a new connection."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._watchdog: asyncio.TimerHandle | None = None
        self.error: BaseException | None = None  # why it is no longer usable

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("Redis closed the connection"))

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        pos = 0
        waiting = self._waiting
        try:
            while pos < len(buf):
                value, pos = _parse(buf, pos)
                if not waiting:
                    raise ValueError("an answer to no command")
                future, _ = waiting.popleft()
                if future.done():
                    continue
                if isinstance(value, ReplyError):
                    future.set_exception(value)
                else:
                    future.set_result(value)
        except _Incomplete:
            pass
        except ValueError as e:
            self._fail(ConnectionError(f"Redis protocol error: {e}"))
            return
        if pos:
            del buf[:pos]

    def command(self, *args: bytes | str | int | float) -> asyncio.Future[Any]:
        """Send a command (in this loop turn's write); the future gets its answer, or the
        exception: ReplyError, ConnectionError, TimeoutError."""
        future = self._loop.create_future()
        if self.error is not None:
            future.set_exception(ConnectionError(str(self.error)))
            return future
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(_encode(args))
        self._waiting.append((future, self._loop.time()))
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(TIMEOUT, self._check_timeout)
        return future

    def _flush(self) -> None:
        if self._out and self._transport is not None and self.error is None:
            self._transport.write(b"".join(self._out))
        self._out.clear()

    def _check_timeout(self) -> None:
        self._watchdog = None
        if not self._waiting:
            return
        late = self._loop.time() - self._waiting[0][1]
        if late >= TIMEOUT:
            self._fail(TimeoutError(f"Redis did not answer within {TIMEOUT:g}s"))
        else:
            self._watchdog = self._loop.call_later(TIMEOUT - late, self._check_timeout)

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._out.clear()
        while self._waiting:
            future, _ = self._waiting.popleft()
            if not future.done():
                future.set_exception(ConnectionError(str(error) or type(error).__name__))
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        self._fail(ConnectionError("closed"))


def _tls_context(options: dict[str, Any]) -> ssl.SSLContext:
    """rediss://: the system's trust store, or ssl_ca_certs; ssl_cert_reqs=none turns the
    check off (as redis-py reads the same query parameters)."""
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    if options.get("ssl_certfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    reqs = options.get("ssl_cert_reqs")
    if reqs in ("none", ssl.CERT_NONE):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif options.get("ssl_check_hostname") in (False, "false", "False"):
        context.check_hostname = False
    return context


class StateUnavailable(Exception):
    """Redis could not be asked (down, refused, timed out, or in its retry pause)."""


class SharedState:
    """One process's view of the shared counters. Make it inside the event loop that uses it."""

    def __init__(self, url: str, prefix: str, *, now: Callable[[], float] = time.monotonic):
        self.url = url
        self.prefix = prefix
        self.process = secrets.token_hex(8)  # this process, for connection counts
        self._now = now
        # raises ValueError on a URL redis-py cannot read
        self._options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call] # redis-py leaves it untyped
        self._pipe: _Pipe | None = None
        self._opening: asyncio.Lock | None = None
        self._retry_at = 0.0  # while now < this, Redis is not asked
        self._warn_at = 0.0  # the next warning line
        self.error = ""  # why Redis is unavailable; "" while it answers
        # Connections that closed while Redis was away, per address: limits.counters takes
        # them back once it answers (a reload makes new Counters over this same object).
        self.unclosed: Counter[str] = Counter()
        self._closes: Counter[str] = Counter()  # closed in this loop turn, sent at its end
        self._is_closed = False  # close() was called: commands it cut short are no failure

    @property
    def is_available(self) -> bool:
        return not self.error

    def now(self) -> float:
        """This process's clock (monotonic, injectable): retry pauses, kept counts."""
        return self._now()

    def key(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}:{name}"

    # --- the connection ------------------------------------------------------------------

    async def _connection(self) -> _Pipe:
        pipe = self._pipe
        if pipe is not None and pipe.error is None:
            return pipe
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:  # one connection for every caller that finds none
            pipe = self._pipe
            if pipe is None or pipe.error is not None:
                self._pipe = None
                pipe = self._pipe = await asyncio.wait_for(self._open(), TIMEOUT)
        return pipe

    async def _open(self) -> _Pipe:
        loop = asyncio.get_running_loop()
        options = self._options
        if "path" in options:
            _, pipe = await loop.create_unix_connection(_Pipe, options["path"])
        else:
            is_tls = getattr(options.get("connection_class"), "__name__", "") == "SSLConnection"
            _, pipe = await loop.create_connection(
                _Pipe, options.get("host", "localhost"), int(options.get("port", 6379)),
                ssl=_tls_context(options) if is_tls else None,
            )  # fmt: skip
        hello: list[asyncio.Future[Any]] = []
        if options.get("password"):
            who = [options["username"]] if options.get("username") else []
            hello.append(pipe.command("AUTH", *who, options["password"]))
        if int(options.get("db") or 0):
            hello.append(pipe.command("SELECT", int(options["db"])))
        for answer in await asyncio.gather(*hello, return_exceptions=True):
            if isinstance(answer, BaseException):
                pipe.close()
                raise answer
        return pipe

    async def _call(self, op: Callable[[_Pipe], Awaitable[T]]) -> T:
        if self.error and self._now() < self._retry_at:
            raise StateUnavailable(self.error)
        try:
            result = await op(await self._connection())
        except (ReplyError, OSError, ValueError) as e:  # TimeoutError, ConnectionError too
            self._failed(e)
            raise StateUnavailable(self.error) from e
        if self.error:
            log.warning("state reachable again url=%s: shared counters resume", self._safe_url)
            self.error = ""
        return result

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        async def run(pipe: _Pipe) -> Any:
            try:
                return await pipe.command("EVALSHA", _SHA[name], len(keys), *keys, *args)
            except ReplyError as e:
                if not str(e).startswith("NOSCRIPT"):
                    raise
                # Redis restarted or its script cache was flushed: EVAL caches it again.
                return await pipe.command("EVAL", _SCRIPTS[name], len(keys), *keys, *args)

        return await self._call(run)

    def _send(self, name: str, keys: list[str], args: list[Any],
              on_error: Callable[[], None]) -> None:  # fmt: skip
        """Run a script whose answer nobody waits for (in this loop turn's write, pipelined
        with the others); `on_error()` when it could not run."""
        if self.error and self._now() < self._retry_at:
            on_error()
            return
        pipe = self._pipe
        if pipe is None or pipe.error is not None:
            task = asyncio.get_running_loop().create_task(self._script(name, keys, args))
            task.add_done_callback(lambda t: None if t.cancelled() or not t.exception()
                                   else on_error())  # fmt: skip
            return

        def done(answer: asyncio.Future[Any], retried: bool = False) -> None:
            error = answer.exception()
            if error is None or self._is_closed:
                return
            if not retried and str(error).startswith("NOSCRIPT"):
                again = pipe.command("EVAL", _SCRIPTS[name], len(keys), *keys, *args)
                again.add_done_callback(lambda a: done(a, retried=True))
                return
            self._failed(error)
            on_error()

        pipe.command("EVALSHA", _SHA[name], len(keys), *keys, *args).add_done_callback(done)

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
        answer = await self._call(lambda pipe: pipe.command("SET", key, value, "NX", "EX",
                                                            int(ttl)))  # fmt: skip
        return answer is not None

    async def clear_trip(self, trip: str) -> None:
        key = self.key("trip", trip)
        await self._call(lambda pipe: pipe.command("DEL", key))

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

    def auth_end(
        self, client: str, login: str, attempt: str, outcome: str, trust_period: float
    ) -> None:
        """End an attempt `auth_begin` let through: outcome "ok", "failed" or "unverified".
        Sent without waiting for the answer; if it is lost, the attempt stays in flight until
        its expiry and stays counted (as a failure, or until a later success forgets it)."""
        args: list[Any] = [attempt, client, login, outcome, trust_period]
        self._send("auth_end", self._auth_keys(client, login), args, on_error=lambda: None)

    # --- connections per client address ------------------------------------------------

    async def heartbeat(self) -> None:
        """This process is alive: its connections count for HEARTBEAT_TTL seconds more."""
        key = self.key("proc", self.process)
        await self._call(lambda pipe: pipe.command("SET", key, "1", "EX", HEARTBEAT_TTL))

    async def admit(self, address: str, maximum: int, client: str = "",
                    window: float = 0.0) -> tuple[bool, int]:  # fmt: skip
        """Count a connection from `address` unless it has `maximum` open in the cluster; with
        `client` (its AUTH key), read its AUTH failures in `window` too, in the same round trip.
        Returns (counted, failures)."""
        keys = [self.key("conn", address), self.key("authc", client or address)]
        args: list[Any] = [self.key("proc", ""), self.process, maximum, CONNECTION_TTL,
                           HEARTBEAT_TTL, window if client else 0]  # fmt: skip
        counted, failures = await self._script("admit", keys, args)
        return bool(counted), int(failures)

    async def conn_close(self, address: str, count: int = 1) -> None:
        await self._script("conn_close", [self.key("conn", address)], [self.process, count])

    def conn_close_soon(self, address: str) -> None:
        """Take a connection back at the end of this loop turn (the closes of one turn from
        one address in one command), without waiting; one that cannot be sent goes to
        `unclosed`."""
        if not self._closes:
            asyncio.get_running_loop().call_soon(self._send_closes)
        self._closes[address] += 1

    def _send_closes(self) -> None:
        closes, self._closes = self._closes, Counter()
        for address, count in closes.items():

            def lost(address: str = address, count: int = count) -> None:
                self.unclosed[address] += count

            self._send("conn_close", [self.key("conn", address)], [self.process, count], lost)

    async def check(self) -> None:
        """PING Redis now (no retry pause: /readyz asks). Raises StateUnavailable naming the
        URL and the error; logs nothing (the counters' users log once a minute)."""
        try:
            pipe = await self._connection()
            await pipe.command("PING")
        except (ReplyError, OSError, ValueError) as e:
            raise StateUnavailable(f"{self._safe_url}: {type(e).__name__}: {e}") from e

    async def close(self) -> None:
        closes, self._closes = self._closes, Counter()
        for address, count in closes.items():
            with contextlib.suppress(StateUnavailable):
                await self.conn_close(address, count)
        self._is_closed = True
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None


_SHA = {name: hashlib.sha1(text.encode()).hexdigest() for name, text in _SCRIPTS.items()}  # noqa: S324

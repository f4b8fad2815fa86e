"""Password checks for AUTH, with a credential cache like Dovecot's auth_cache.

Owns: calling the directory's argon2 verification off the event loop, and remembering successful
verifications for a few minutes so that a client that reconnects for every message does not pay
argon2 each time. The cache key is an HMAC (with a per-process random key) of login and password:
the password itself is never stored. Entries die after `ttl` seconds, and all of them when the
directory's generation changes (passwd, disable, remove, suspend). Failures are never cached, so
a wrong password always costs a full verification (no timing oracle for "exists" vs "cached").
Two more things keep argon2 affordable: identical verifications that overlap share one
computation (a client that opens 20 connections at once pays argon2 once, not 20 times), and
verifications run on a small dedicated pool, so at most `parallel` argon2 buffers (19 MiB each)
exist at a time and malloc keeps few per-thread arenas alive afterwards.
Must not: log passwords.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from mailgate.directory import Directory, User

_MAX_ENTRIES = 100_000


class Authenticator:
    def __init__(self, directory: Directory, *, ttl: float = 300.0, parallel: int = 2) -> None:
        self._directory = directory
        self._ttl = ttl
        self._key = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, tuple[float, User]] = OrderedDict()
        self._generation: int | None = None
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="argon2")
        self._inflight: dict[bytes, asyncio.Future[User | None]] = {}

    async def verify(self, login: str, password: str) -> User | None:
        """The user when the credentials are valid and the account usable, else None."""
        token = hmac.new(
            self._key, login.encode() + b"\0" + password.encode(), hashlib.sha256
        ).digest()
        generation = self._directory.generation()  # one indexed SQLite read: cheap
        if generation != self._generation:
            self._cache.clear()
            self._generation = generation
        hit = self._cache.get(token)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        pending = self._inflight.get(token)
        if pending is None:
            pending = asyncio.get_running_loop().run_in_executor(
                self._pool, self._directory.verify_password, login, password
            )
            self._inflight[token] = pending
            pending.add_done_callback(lambda _: self._inflight.pop(token, None))
        # shield: one waiter's timeout or disconnect must not cancel the others' answer.
        user = await asyncio.shield(pending)
        if user is not None:
            self._cache[token] = (now + self._ttl, user)
            if len(self._cache) > _MAX_ENTRIES:
                self._cache.popitem(last=False)
        return user

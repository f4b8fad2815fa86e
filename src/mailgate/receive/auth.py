"""Password checks for AUTH, with a credential cache like Dovecot's auth_cache.

Owns: calling the directory's argon2 verification off the event loop, and remembering successful
verifications for a few minutes so that a client that reconnects for every message does not pay
argon2 each time. The cache key is an HMAC (with a per-process random key) of login and password:
the password itself is never stored. Entries die after `ttl` seconds, and all of them when the
directory's generation changes (passwd, disable, remove, suspend). Failures are never cached, so
a wrong password always costs a full verification (no timing oracle for "exists" vs "cached").
Must not: log passwords.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict

from mailgate.directory import Directory, User

_MAX_ENTRIES = 100_000


class Authenticator:
    def __init__(self, directory: Directory, *, ttl: float = 300.0) -> None:
        self._directory = directory
        self._ttl = ttl
        self._key = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, tuple[float, User]] = OrderedDict()
        self._generation: int | None = None

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
        user = await asyncio.to_thread(self._directory.verify_password, login, password)
        if user is not None:
            self._cache[token] = (now + self._ttl, user)
            if len(self._cache) > _MAX_ENTRIES:
                self._cache.popitem(last=False)
        return user

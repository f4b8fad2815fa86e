"""Password checks for AUTH, in front of every backend, with a credential cache like Dovecot's
auth_cache.

Owns: asking the configured `Backend`; refusing accounts the directory has disabled or
suspended, whatever the backend (an LDAP login gets a users row with its first grant, and
`mailgate user disable` then refuses it too); and remembering successful checks for
`[auth] cache_ttl` seconds (60 by default), so that a client that reconnects for every message
does not cost an argon2 hash or an LDAP bind each time. A password changed in LDAP therefore
takes effect within cache_ttl; a change in mailgate's own directory (passwd, disable, remove,
suspend) empties the cache at once (the directory's generation moves).

The cache key is an HMAC (with a per-process random key) of login and password: the password
itself is never stored. Failures and `AuthUnavailable` are never cached, so a wrong password
always costs a full check (no timing oracle for "exists" vs "cached") and a backend that comes
back is used at once. Identical checks that overlap share one computation: a client that opens
20 connections at once costs one check, not 20. An empty password never succeeds (RFC 4513
§5.1.2: an LDAP simple bind with one is an unauthenticated bind, which servers accept).
Must not: log passwords, or decide replies (the session maps the outcome).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

from mailgate.auth import Backend, Identity
from mailgate.auth.oauth import TokenVerifier
from mailgate.directory import Directory, passwords
from mailgate.errors import AuthUnavailable, DirectoryError

_MAX_ENTRIES = 100_000
TOKEN_MECHANISMS = ("OAUTHBEARER", "XOAUTH2")  # smtp.parse.TOKEN_MECHANISMS (auth imports no smtp)
T = TypeVar("T")


class Authenticator:
    def __init__(self, backend: Backend, directory: Directory, *, ttl: float = 60.0,
                 tokens: TokenVerifier | None = None) -> None:  # fmt: skip
        self.backend = backend
        self.tokens = tokens
        self._directory = directory
        self._ttl = ttl
        self._key = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, tuple[float, Identity]] = OrderedDict()
        self._generation: int | None = None
        self._inflight: dict[bytes, asyncio.Future[Identity | None]] = {}

    @property
    def accepts_tokens(self) -> bool:
        """OAUTHBEARER and XOAUTH2 are offered ([auth.oauth] jwks_url is set)."""
        return self.tokens is not None

    async def verify(self, login: str, password: str, mechanism: str = "PLAIN") -> Identity | None:
        """The identity when the credentials are valid and the account usable, else None.
        Raises AuthUnavailable when the backend (or the directory) cannot answer. For
        OAUTHBEARER and XOAUTH2, `password` is the bearer token and `login` what the client
        said it is ("" or the token's login)."""
        if mechanism in TOKEN_MECHANISMS:
            return await self._check_token(login, password)
        token = hmac.new(
            self._key, login.encode() + b"\0" + password.encode(), hashlib.sha256
        ).digest()
        generation = _directory_call(self._directory.generation)  # one indexed read: cheap
        if generation != self._generation:
            self._cache.clear()
            self._generation = generation
        hit = self._cache.get(token)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        pending = self._inflight.get(token)
        if pending is None:
            pending = asyncio.ensure_future(self._check(login, password))
            self._inflight[token] = pending
            pending.add_done_callback(lambda _: self._inflight.pop(token, None))
        # shield: one waiter's timeout or disconnect must not cancel the others' answer.
        identity = await asyncio.shield(pending)
        # An app password is not cached: one indexed read per use, and its removal holds at
        # once on every node (the directory view's generation may lag by a poll interval).
        if identity is not None and identity.app_password is None and self._ttl > 0:
            self._cache[token] = (now + self._ttl, identity)
            if len(self._cache) > _MAX_ENTRIES:
                self._cache.popitem(last=False)
        return identity

    async def _check(self, login: str, password: str) -> Identity | None:
        if not password:
            return None
        if passwords.is_app_password_shaped(password):
            app = await self._app_password(login, password)
            if app is not None:
                return app
        identity = await self.backend.verify(login, password)
        if identity is None:
            return None
        # The server's directory is a snapshot (directory/cache.py): catch up with changes
        # made before this login (a grant added a moment ago, a disable on another node).
        await asyncio.to_thread(_directory_call, self._directory.sync)
        if not self._is_usable(identity.login):
            return None
        return identity

    async def _check_token(self, claimed: str, token: str) -> Identity | None:
        """A bearer token: verified (signature, issuer, audience, expiry: cheap once the key
        set is cached, and never cached itself, so an expired token stops at once), then its
        login must be one the backend knows and the directory has not disabled."""
        if self.tokens is None:
            return None
        login = await self.tokens.login(token)
        if login is None or (claimed and claimed.lower() != login.lower()):
            return None
        _directory_call(self._directory.generation)  # a database that cannot answer: 454
        identity = await self.backend.lookup(login)
        if identity is None or not self._is_usable(identity.login):
            return None
        return identity

    async def _app_password(self, login: str, password: str) -> Identity | None:
        """An app password of `login` (any backend): the directory knows its hash, the backend
        the login's addresses. A miss falls through to the backend: a person's own password
        may happen to have an app password's shape."""
        secret_hash = passwords.app_password_hash(password)
        try:
            name = await asyncio.to_thread(self._directory.use_app_password, login, secret_hash)
        except DirectoryError as e:
            raise AuthUnavailable(str(e)) from None
        if name is None:
            return None
        identity = await self.backend.lookup(login)
        if identity is None or not self._is_usable(identity.login):
            return None
        return replace(identity, app_password=name)

    def _is_usable(self, login: str) -> bool:
        """False when the directory has the login disabled or suspended. A login the
        directory does not know (an LDAP or Dovecot account) is usable."""
        user = _directory_call(self._directory.get_user, login)
        return user is None or (user.enabled and not user.suspended)

    def keep_account(self, login: str, addresses: tuple[str, ...]) -> None:
        """Give an LDAP or Dovecot login (one with backend addresses) a users row, so that the
        account breaker can suspend it there. Blocking: call it from a thread. A failure is
        logged by the breaker's own attempt that follows, so it is not raised here."""
        if addresses:
            with contextlib.suppress(DirectoryError):
                self._directory.ensure_account(login, addresses[0])

    def close(self) -> None:
        self.backend.close()


def _directory_call(function: Callable[..., T], *args: object) -> T:
    """A directory read on the AUTH path: a database that cannot be read is AuthUnavailable."""
    try:
        return function(*args)
    except DirectoryError as e:
        raise AuthUnavailable(str(e)) from None

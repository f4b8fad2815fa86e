"""The authenticator in front of every backend: cache hits, shared concurrent checks,
invalidation, no negative cache, AuthUnavailable never cached, directory flags for every backend."""

from __future__ import annotations

import asyncio
import threading

import pytest

from mailgate.auth import Identity
from mailgate.auth.authenticator import Authenticator
from mailgate.auth.directory import DirectoryBackend
from mailgate.directory import User
from mailgate.errors import AuthUnavailable
from tests.support.memdir import MemoryDirectory
from tests.support.waiting import wait_for_async


class CountingDirectory(MemoryDirectory):
    """Counts password verifications; each takes a moment, as argon2 does."""

    def __init__(self) -> None:
        super().__init__()
        self.verifications = 0
        self._lock = threading.Lock()
        self.release = threading.Event()

    def verify_password(self, login: str, password: str) -> User | None:
        with self._lock:
            self.verifications += 1
        self.release.wait(5)
        return super().verify_password(login, password)


class ScriptedBackend:
    """An external backend (LDAP, Dovecot) that answers from a dict, or is down."""

    name = "scripted"

    def __init__(self) -> None:
        self.passwords = {"carol": "right"}
        self.is_down = False
        self.calls = 0

    async def verify(self, login: str, password: str) -> Identity | None:
        self.calls += 1
        if self.is_down:
            raise AuthUnavailable("connection refused")
        if self.passwords.get(login) != password:
            return None
        return Identity(login, (f"{login}@example.org", f"{login}.alias@example.org"))

    async def lookup(self, login: str) -> Identity | None:
        return Identity(login, (f"{login}@example.org",)) if login in self.passwords else None

    def close(self) -> None:
        pass


def test_cache_hits_shared_flights_and_invalidation() -> None:
    d = CountingDirectory()
    d.add_user("alice", "", "right")
    auth = Authenticator(DirectoryBackend(d), d)

    async def scenario() -> None:
        # 20 sessions log in at once with the same credentials: one verification.
        tasks = [asyncio.ensure_future(auth.verify("alice", "right")) for _ in range(20)]
        # Every task has joined the flight once the one verification is under way.
        await wait_for_async(lambda: d.verifications == 1, what="the shared verification")
        d.release.set()
        users = await asyncio.gather(*tasks)
        assert all(u is not None and u.login == "alice" for u in users)
        assert d.verifications == 1
        assert (await auth.verify("alice", "right")) is not None  # cached
        assert d.verifications == 1
        # Wrong passwords are verified every time: no cache, no shortcut.
        assert await auth.verify("alice", "wrong") is None
        assert await auth.verify("alice", "wrong") is None
        assert d.verifications == 3
        # A password change (the directory's generation moves) empties the cache.
        d.set_password("alice", "new")
        assert await auth.verify("alice", "right") is None
        assert (await auth.verify("alice", "new")) is not None
        assert d.verifications == 5

    asyncio.run(scenario())


def test_a_cancelled_waiter_does_not_cancel_the_others() -> None:
    d = CountingDirectory()
    d.add_user("alice", "", "right")
    auth = Authenticator(DirectoryBackend(d), d)

    async def scenario() -> None:
        first = asyncio.ensure_future(auth.verify("alice", "right"))
        second = asyncio.ensure_future(auth.verify("alice", "right"))
        await wait_for_async(lambda: d.verifications == 1, what="the shared verification")
        first.cancel()
        d.release.set()
        assert (await second) is not None
        assert d.verifications == 1

    asyncio.run(scenario())


def test_an_unavailable_backend_is_never_cached_and_comes_back_at_once() -> None:
    backend = ScriptedBackend()
    auth = Authenticator(backend, MemoryDirectory())

    async def scenario() -> None:
        backend.is_down = True
        with pytest.raises(AuthUnavailable):
            await auth.verify("carol", "right")
        backend.is_down = False
        identity = await auth.verify("carol", "right")
        assert identity == Identity("carol", ("carol@example.org", "carol.alias@example.org"))
        backend.is_down = True  # a cached success survives an outage for cache_ttl ...
        assert await auth.verify("carol", "right") == identity
        with pytest.raises(AuthUnavailable):  # ... but a wrong password is never "cached"
            await auth.verify("carol", "wrong")

    asyncio.run(scenario())


def test_ttl_zero_asks_the_backend_every_time() -> None:
    backend = ScriptedBackend()
    auth = Authenticator(backend, MemoryDirectory(), ttl=0)

    async def scenario() -> None:
        for _ in range(3):
            assert await auth.verify("carol", "right") is not None
        assert backend.calls == 3

    asyncio.run(scenario())


def test_an_empty_password_never_reaches_the_backend() -> None:
    # RFC 4513 §5.1.2: a simple bind with an empty password is an unauthenticated bind, which
    # an LDAP server answers with success. It must never become a login.
    backend = ScriptedBackend()
    backend.passwords["dave"] = ""
    auth = Authenticator(backend, MemoryDirectory())
    assert asyncio.run(auth.verify("dave", "")) is None
    assert backend.calls == 0


def test_the_directory_disables_and_suspends_external_logins() -> None:
    backend = ScriptedBackend()
    d = MemoryDirectory()
    auth = Authenticator(backend, d)

    async def scenario() -> None:
        assert await auth.verify("carol", "right") is not None  # no row: usable
        d.add_user("carol", "", "!")  # a row that holds the account's flags
        d.set_suspended("carol", True)  # the breaker; the generation moves
        assert await auth.verify("carol", "right") is None
        d.set_enabled("carol", True)
        assert await auth.verify("carol", "right") is not None
        d.set_enabled("carol", False)
        assert await auth.verify("carol", "right") is None

    asyncio.run(scenario())

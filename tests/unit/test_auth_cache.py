"""The credential cache: hits, shared concurrent verifications, invalidation, no negative cache."""

from __future__ import annotations

import asyncio
import threading

from mailgate.directory import User
from mailgate.receive.auth import Authenticator
from tests.support.memdir import MemoryDirectory


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


def test_cache_hits_shared_flights_and_invalidation() -> None:
    d = CountingDirectory()
    d.add_user("alice", "", "right")
    auth = Authenticator(d)

    async def scenario() -> None:
        # 20 sessions log in at once with the same credentials: one verification.
        tasks = [asyncio.ensure_future(auth.verify("alice", "right")) for _ in range(20)]
        await asyncio.sleep(0.05)
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
    auth = Authenticator(d)

    async def scenario() -> None:
        first = asyncio.ensure_future(auth.verify("alice", "right"))
        second = asyncio.ensure_future(auth.verify("alice", "right"))
        await asyncio.sleep(0.05)
        first.cancel()
        d.release.set()
        assert (await second) is not None
        assert d.verifications == 1

    asyncio.run(scenario())

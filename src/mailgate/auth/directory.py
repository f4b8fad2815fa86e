"""The "directory" backend: passwords hashed with argon2id in mailgate's own directory.

Owns: running `Directory.verify_password` (argon2id, tens of milliseconds of CPU and 19 MiB) on
a small dedicated thread pool, so that at most `parallel` argon2 buffers exist at a time and
malloc keeps few per-thread arenas alive afterwards. Timing: the directory verifies a dummy hash
for an unknown login, so both failures cost one argon2 verification.
Must not: cache (auth/authenticator.py does), or log passwords.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from mailgate.auth import Identity
from mailgate.directory import Directory
from mailgate.errors import AuthUnavailable, DirectoryError


class DirectoryBackend:
    name = "directory"

    def __init__(self, directory: Directory, *, parallel: int = 2) -> None:
        self._directory = directory
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="argon2")

    async def verify(self, login: str, password: str) -> Identity | None:
        loop = asyncio.get_running_loop()
        try:
            user = await loop.run_in_executor(
                self._pool, self._directory.verify_password, login, password
            )
        except DirectoryError as e:  # the database could not be read: temporary
            raise AuthUnavailable(str(e)) from None
        return None if user is None else Identity(login=user.login)

    async def lookup(self, login: str) -> Identity | None:
        try:
            user = await asyncio.to_thread(self._directory.get_user, login)
        except DirectoryError as e:
            raise AuthUnavailable(str(e)) from None
        return None if user is None else Identity(login=user.login)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

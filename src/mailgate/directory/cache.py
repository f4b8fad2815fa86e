"""The server's view of the directory: policy questions answered from memory, kept fresh.

Owns: a snapshot of users (without password hashes), grants and domains with their DKIM key
rows, loaded from the backend by a background thread and reloaded whenever the directory's
generation changes, so that no directory question asked on the event loop waits for a
database. How fast a change made elsewhere (another node, `mailgate user ...`) arrives:
  - PostgreSQL: every change sends a NOTIFY (see the migrations); a dedicated connection
    LISTENs, so the reload starts at once;
  - the fallback (SQLite, or while the LISTEN connection is down): the generation is read
    every POLL_INTERVAL seconds. Either way a change holds within 10 s (POLL_INTERVAL plus
    one load).
Password checks and writes (`verify_password`, `set_suspended`) go to the backend, and the
callers run them in threads (auth/directory.py, the breaker).

When the database cannot be reached the last snapshot keeps answering (the smart host keeps
relaying and signing from it), one warning line a minute says so, and `is_available` is
False; password checks fail with DirectoryUnavailable (454 4.7.0).
Memory: one small record per user, grant and domain (a 100 000-user directory is tens of MB).
Must not: know about SMTP, or hold password hashes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from mailgate.directory import AppPassword, User
from mailgate.directory.names import WILDCARD_LOCAL, normalize_address, normalize_domain
from mailgate.directory.sql import SqlDirectory
from mailgate.errors import DirectoryError
from mailgate.log import Throttle
from mailgate.values import DkimKey, Domain

log = logging.getLogger(__name__)

POLL_INTERVAL = 2.0  # seconds between generation reads when no NOTIFY arrives
_STOP_CHECK = 0.5  # seconds: how soon the refresher notices close()


def _key(text: str) -> str:
    """Logins and addresses compare case-insensitively, as both databases compare them."""
    return text.lower()


@dataclass(frozen=True, slots=True)
class Snapshot:
    generation: int = -1
    users: dict[str, User] = field(default_factory=dict)  # by _key(login)
    grants: dict[str, frozenset[str]] = field(default_factory=dict)  # _key(login) -> addresses
    domains: dict[str, Domain] = field(default_factory=dict)  # by lower-case name


def load_snapshot(backend: SqlDirectory) -> Snapshot:
    """Everything the server asks on the event loop, read in one go (several transactions;
    a change between them bumps the generation again, which reloads)."""
    generation = backend.generation()
    users = {_key(u.login): u for u in backend.list_users()}
    grants: dict[str, set[str]] = {}
    for address, login in backend.list_grants():
        grants.setdefault(_key(login), set()).add(_key(address))
    domains = {d.name.lower(): d for d in backend.list_domains()}
    return Snapshot(
        generation=generation,
        users=users,
        grants={login: frozenset(addresses) for login, addresses in grants.items()},
        domains=domains,
    )


class DirectoryView:
    """A `Directory` for the server: reads from the snapshot, writes to the backend.

    start() loads the first snapshot (in the caller's thread: before the event loop runs) and
    starts the refresher thread; close() stops it and closes the backend.
    """

    def __init__(self, backend: SqlDirectory, *, poll_interval: float = POLL_INTERVAL) -> None:
        self.backend = backend
        self.default_domain = backend.default_domain
        self._poll_interval = poll_interval
        self._snapshot = Snapshot()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warn = Throttle()
        self.is_available = False  # the last look at the database succeeded
        self._is_down = False  # a failure was logged and no success since
        self._next_poll_at = 0.0
        self._loading = threading.Lock()
        self.reloads = 0  # snapshots loaded (for tests and the log)

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._refresh()
        self._thread = threading.Thread(target=self._run, name="directory-refresh", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.backend.close()

    def _run(self) -> None:
        listen = getattr(self.backend, "listen", None)
        while not self._stop.is_set():
            if listen is not None:
                try:
                    listen(self._stop.is_set, self._wake, timeout=_STOP_CHECK)
                except DirectoryError as e:
                    self._unavailable(e)
            else:
                self._refresh()
            self._stop.wait(self._poll_interval)

    def _wake(self, notified: bool) -> None:
        """From listen(): a NOTIFY came (reload now), or a quiet interval passed."""
        if notified or time.monotonic() >= self._next_poll_at:
            self._refresh()

    def _refresh(self) -> None:
        """Reload when the generation moved; never raises (the old snapshot stays)."""
        with self._loading:  # the refresher and a verification thread: one load at a time
            self._load_if_changed()

    def _load_if_changed(self) -> None:
        self._next_poll_at = time.monotonic() + self._poll_interval
        try:
            generation = self.backend.generation()
            if generation != self._snapshot.generation:
                if self._snapshot.generation == -1:
                    self.backend.check_schema()
                self._snapshot = load_snapshot(self.backend)
                self.reloads += 1
                log.info("directory loaded generation=%d users=%d domains=%d",
                         self._snapshot.generation, len(self._snapshot.users),
                         len(self._snapshot.domains))  # fmt: skip
            if self._is_down:
                log.warning("directory reachable again db=%s", self.backend.label)
            self._is_down = False
            self.is_available = True
        except DirectoryError as e:
            self._unavailable(e)

    def _unavailable(self, error: DirectoryError) -> None:
        self.is_available = False
        self._is_down = True
        if self._warn.ready():
            log.warning("directory unavailable, answering from the snapshot of generation=%d "
                        "(logged once a minute): %s", self._snapshot.generation, error)  # fmt: skip

    # --- reads: from the snapshot ----------------------------------------------------------

    def generation(self) -> int:
        return self._snapshot.generation

    def get_user(self, login: str) -> User | None:
        return self._snapshot.users.get(_key(login))

    def list_users(self) -> list[User]:
        return sorted(self._snapshot.users.values(), key=lambda u: u.login)

    def get_domain(self, name: str) -> Domain | None:
        return self._snapshot.domains.get(name.lower().removesuffix("."))

    def list_domains(self) -> list[Domain]:
        return sorted(self._snapshot.domains.values(), key=lambda d: d.name)

    def list_grants(self, owner: str | None = None) -> list[tuple[str, str]]:
        snap = self._snapshot
        return sorted(
            (address, user.login)
            for key, addresses in snap.grants.items()
            if (user := snap.users.get(key)) is not None and (owner is None or key == _key(owner))
            for address in addresses
        )

    def is_managed(self, domain: str) -> bool:
        try:
            name = normalize_domain(domain)
        except DirectoryError:
            return False
        return name == self.default_domain or name in self._snapshot.domains

    def may_send_as(self, login: str, address: str) -> bool:
        try:
            wanted = _key(normalize_address(address))
        except DirectoryError:
            return False
        snap = self._snapshot
        user = snap.users.get(_key(login))
        if user is None:
            return False
        if _key(user.address) == wanted:
            return True
        granted = snap.grants.get(_key(login), frozenset())
        return wanted in granted or f"{WILDCARD_LOCAL}@{wanted.rpartition('@')[2]}" in granted

    # --- the rest: the backend (callers run these in threads) ------------------------------

    def sync(self) -> None:
        """Reload now if the generation moved (blocking: from a thread). The authenticator
        calls it after a successful password check, so that a session sees every change
        made before its login (a user, grant or domain added a moment ago)."""
        self._refresh()

    def verify_password(self, login: str, password: str) -> User | None:
        return self.backend.verify_password(login, password)

    def set_suspended(self, login: str, suspended: bool) -> None:
        """The breaker's suspension: this process holds it at once (its credential cache is
        dropped with the generation), the others with their next reload."""
        self.backend.set_suspended(login, suspended)
        self._refresh()

    def add_user(self, login: str, address: str, password: str) -> User:
        return self.backend.add_user(login, address, password)

    def ensure_account(self, login: str, address: str) -> bool:
        return self.backend.ensure_account(login, address)

    # App passwords are read from the backend when used (auth/authenticator.py, in a thread):
    # a removed one is refused at once, without waiting for the next snapshot.
    def add_app_password(self, login: str, name: str, secret_hash: str) -> AppPassword:
        return self.backend.add_app_password(login, name, secret_hash)

    def list_app_passwords(self, login: str | None = None) -> list[AppPassword]:
        return self.backend.list_app_passwords(login)

    def remove_app_password(self, login: str, name: str) -> None:
        self.backend.remove_app_password(login, name)

    def use_app_password(self, login: str, secret_hash: str) -> str | None:
        return self.backend.use_app_password(login, secret_hash)

    def set_password(self, login: str, password: str) -> None:
        self.backend.set_password(login, password)

    def set_enabled(self, login: str, enabled: bool) -> None:
        self.backend.set_enabled(login, enabled)

    def remove_user(self, login: str) -> None:
        self.backend.remove_user(login)

    def add_domain(self, name: str) -> Domain:
        return self.backend.add_domain(name)

    def remove_domain(self, name: str) -> None:
        self.backend.remove_domain(name)

    def set_smarthost_networks(self, domain: str, networks: Sequence[str]) -> None:
        self.backend.set_smarthost_networks(domain, networks)

    def add_dkim_key(self, domain: str, key: DkimKey) -> None:
        self.backend.add_dkim_key(domain, key)

    def set_dkim_key_active(self, domain: str, selector: str, active: bool) -> None:
        self.backend.set_dkim_key_active(domain, selector, active)

    def remove_dkim_key(self, domain: str, selector: str) -> None:
        self.backend.remove_dkim_key(domain, selector)

    def grant(self, address: str, login: str) -> None:
        self.backend.grant(address, login)

    def revoke(self, address: str, login: str | None = None) -> None:
        self.backend.revoke(address, login)

"""The directory: accounts, managed domains, granted addresses, DKIM key references.

`Directory` is the interface. directory/sql.py holds its queries and rules once, and two
backends supply the database: `directory.store.SqliteDirectory` (one node) and
`directory.postgres.PostgresDirectory` (several nodes); `open_url()` picks one from
`[directory] url`. directory/migrate.py numbers the schema steps of both; directory/cache.py
is the server's in-memory view (no database wait on the event loop). Must not: know about SMTP.
Addresses are compared case-insensitively in the domain and case-preservingly in the local part
except that lookups lower-case both (what operators expect).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mailgate.values import DkimKey, Domain

if TYPE_CHECKING:
    from mailgate.directory.sql import SqlDirectory


@dataclass(frozen=True, slots=True)
class User:
    login: str
    address: str  # primary address
    enabled: bool = True
    suspended: bool = False  # set by the compromised-account breaker; cleared by `user enable`


@dataclass(frozen=True, slots=True)
class AppPassword:
    """A password for one program of one login (`mailgate app-password`); never the secret.

    login, name:  whose and which (the name is unique per login, e.g. "thunderbird-laptop").
    created_at:   aware UTC.
    last_used_at: aware UTC of the last AUTH that used it (not counting answers from the
                  server's credential cache), or None.
    """

    login: str
    name: str
    created_at: dt.datetime
    last_used_at: dt.datetime | None = None


class Directory(Protocol):
    # users ------------------------------------------------------------------
    def add_user(self, login: str, address: str, password: str) -> User: ...
    def ensure_account(self, login: str, address: str) -> bool:
        """A users row without a password, for a login another [auth] backend checks (it
        holds grants, app passwords and the enabled/suspended flags). False if one exists."""
        ...

    def set_password(self, login: str, password: str) -> None: ...
    def set_enabled(self, login: str, enabled: bool) -> None: ...
    def set_suspended(self, login: str, suspended: bool) -> None: ...
    def remove_user(self, login: str) -> None: ...
    def get_user(self, login: str) -> User | None: ...
    def list_users(self) -> list[User]: ...

    def verify_password(self, login: str, password: str) -> User | None:
        """The user if the login exists, is enabled and not suspended, and the password matches.
        Takes the same time whether or not the login exists (a dummy hash is verified)."""
        ...

    # app passwords ------------------------------------------------------------------
    def add_app_password(self, login: str, name: str, secret_hash: str) -> AppPassword:
        """Store an app password's hash (passwords.app_password_hash) for an existing login."""
        ...

    def list_app_passwords(self, login: str | None = None) -> list[AppPassword]:
        """By login, then name."""
        ...

    def remove_app_password(self, login: str, name: str) -> None: ...
    def use_app_password(self, login: str, secret_hash: str) -> str | None:
        """The name of `login`'s app password with this hash, recording the use; else None."""
        ...

    # domains and grants -----------------------------------------------------------
    def add_domain(self, name: str) -> Domain: ...
    def remove_domain(self, name: str) -> None: ...
    def get_domain(self, name: str) -> Domain | None: ...
    def list_domains(self) -> list[Domain]: ...
    def set_smarthost_networks(self, domain: str, networks: tuple[str, ...]) -> None:
        """Replace the networks whose smart-host mail from this domain may be DKIM-signed."""
        ...

    def add_dkim_key(self, domain: str, key: DkimKey) -> None: ...
    def set_dkim_key_active(self, domain: str, selector: str, active: bool) -> None: ...
    def remove_dkim_key(self, domain: str, selector: str) -> None: ...

    def grant(self, address: str, login: str) -> None:
        """Let `login` send as `address`; address may be "*@domain" (domain-wide)."""
        ...

    def revoke(self, address: str, login: str | None = None) -> None: ...
    def list_grants(self, owner: str | None = None) -> list[tuple[str, str]]:
        """(address, login) pairs, sorted."""
        ...

    # policy questions ---------------------------------------------------------
    def is_managed(self, domain: str) -> bool:
        """True for the default domain and every managed domain."""
        ...

    def may_send_as(self, login: str, address: str) -> bool:
        """The user's primary address, an exact grant, or a domain-wide grant."""
        ...

    def generation(self) -> int:
        """A number that changes whenever users or passwords change (for credential caches)."""
        ...

    def sync(self) -> None:
        """Catch up now with changes made elsewhere (another node, the CLI). Blocking: call
        it from a thread. A no-op for a database that is read directly; the server's view
        (directory/cache.py) reloads its snapshot if the generation moved."""
        ...


def open_url(
    url: str, *, default_domain: str, data_dir: Path, check: bool = True, pool_size: int = 4
) -> SqlDirectory:
    """The backend for `[directory] url` (sqlite:///PATH or postgresql://...).

    check: verify the PostgreSQL schema version now (a SQLite file is migrated on opening).
    """
    if url.startswith(("postgresql://", "postgres://")):
        from mailgate.directory.postgres import PostgresDirectory

        return PostgresDirectory(url, default_domain=default_domain, data_dir=data_dir,
                                 max_size=pool_size, check=check)  # fmt: skip
    from mailgate.directory.store import SqliteDirectory

    return SqliteDirectory(
        Path(url.removeprefix("sqlite:///")), default_domain=default_domain, data_dir=data_dir
    )

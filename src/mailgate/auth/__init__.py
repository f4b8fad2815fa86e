"""Authentication: checking an AUTH login and password against the institution's accounts.

Owns: the `Backend` interface that every password source implements (the directory's own
argon2 hashes, an LDAP server, Dovecot's auth service), the `Identity` a successful check
yields, and `open_backend()`, which builds the backend `[auth] backend` names. The credential
cache and app passwords, common to every backend, are in auth/authenticator.py.
Must not: know about SMTP (the session calls `Authenticator.verify` and maps the outcome to a
reply), decide sender policy (policy.py does, with the addresses an Identity carries), or log
passwords.

Outcomes, the same for every backend: an `Identity` (the password is right and the account
usable), None (unknown login or wrong password: the session answers 535 5.7.8, with the same text
and no faster for one than for the other), or `errors.AuthUnavailable` (the backend could not
answer: 454 4.7.0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mailgate.auth.authenticator import Authenticator
    from mailgate.config import Config
    from mailgate.directory import Directory


@dataclass(frozen=True, slots=True)
class Identity:
    """Who authenticated.

    login:        the AUTH identity as the session records it (Received:, logs, rate limits).
    addresses:    addresses the backend vouches for, the primary one first (LDAP's
                  address_attribute then alias_attributes; Dovecot's user, or
                  LOGIN@default_domain). Empty for the directory backend: its users table
                  holds the primary address, and policy.py asks it. Grants made with
                  `mailgate address add` are added to these by policy.py for every backend.
    app_password: the name of the app password used, or None (for the log only).
    """

    login: str
    addresses: tuple[str, ...] = ()
    app_password: str | None = None


class Backend(Protocol):
    """A source of truth for passwords. Implementations must not block the event loop."""

    name: str

    async def verify(self, login: str, password: str) -> Identity | None:
        """The identity when `password` is right for `login`; None for an unknown login or a
        wrong password. Raise AuthUnavailable when the backend cannot answer."""
        ...

    async def lookup(self, login: str) -> Identity | None:
        """The identity of `login` without a password (after an app password matched), or
        None when the backend does not know it. Raise AuthUnavailable as verify() does."""
        ...

    def close(self) -> None:
        """Release connections and threads."""
        ...


def open_backend(cfg: Config, directory: Directory) -> Backend:
    """The backend `[auth] backend` names (imported lazily: python-ldap only when used)."""
    if cfg.auth.backend == "ldap":
        from mailgate.auth.ldap import LdapBackend

        return LdapBackend(cfg.auth.ldap, default_domain=cfg.directory.default_domain)
    if cfg.auth.backend == "dovecot":
        from mailgate.auth.dovecot import DovecotBackend

        return DovecotBackend(cfg.auth.dovecot, default_domain=cfg.directory.default_domain)
    from mailgate.auth.directory import DirectoryBackend

    return DirectoryBackend(directory)


def open_authenticator(cfg: Config, directory: Directory) -> Authenticator:
    """The authenticator `cli serve` gives the sessions: the backend, the credential cache and,
    when [auth.oauth] jwks_url is set, the bearer-token verifier."""
    from mailgate.auth.authenticator import Authenticator

    tokens = None
    if cfg.auth.oauth.jwks_url:
        from mailgate.auth.oauth import TokenVerifier

        tokens = TokenVerifier(cfg.auth.oauth)
    return Authenticator(open_backend(cfg, directory), directory, ttl=cfg.auth.cache_ttl,
                         tokens=tokens)  # fmt: skip

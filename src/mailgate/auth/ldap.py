"""The "ldap" backend: find the user's entry, then bind as it with the given password.

Owns: the LDAP conversation of one AUTH (RFC 4511, 4513, 4515, 4516) and a small pool of
connections. Must not: cache results (auth/authenticator.py does), store or log passwords, or
run on the event loop (every LDAP call runs on this backend's own thread pool).

One check, as Postfix's and Maddy's LDAP lookups and pam_ldap do it:
  1. search `base` (subtree) with `filter`, in which `{login}` is replaced by the login escaped
     as RFC 4515 §3 says (`*`, `(`, `)`, `\\` and NUL as \\2a, \\28, \\29, \\5c, \\00), so a login
     can never widen the search; the search runs anonymously or as `bind_dn` (whose password is
     the first line of `bind_password_file`);
  2. exactly one entry must match (none: unknown login; several: refused and logged);
  3. a simple bind (RFC 4513 §5.1.3) as that entry's DN with the password, on a connection
     used only for user binds. invalidCredentials means a wrong password.
An unknown login still costs one bind (to a DN that does not exist, which slapd and Active
Directory answer with invalidCredentials), so it takes as long as a wrong password. An empty
password is refused before any of this (auth/authenticator.py): it would be an
unauthenticated bind, which servers accept (RFC 4513 §5.1.2).

Addresses: every value of `address_attribute` (the first is the primary address; without one,
LOGIN@default_domain), then every value of `alias_attributes`; Active Directory's
proxyAddresses form "smtp:a@b" (any case) counts as a@b, other typed values ("sip:", "X500:")
are skipped.

TLS: ldaps:// (implicit TLS) or `starttls` (RFC 4513 §3), on every connection, search and bind
alike; the server's certificate must verify against `ca_file` (or the system's CAs) and match
the URL's host name, or the check fails as unavailable (454 4.7.0), never falling back to
plaintext.

Failures that are not the user's (refused connection, timeout, TLS failure, server busy or
misconfigured) raise AuthUnavailable. Every connect and operation is bounded by `timeout`, and
the whole check by a deadline on the event loop side, so a server that hangs gives 454 4.7.0
instead of a stuck session. Pooled connections are reused; one that fails is dropped and the
operation retried once on a new connection (a server restart closes every pooled connection).

Library: python-ldap (the binding of OpenLDAP's own libldap, the client library slapd ships
with); see docs/ARCHITECTURE.md for the choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import ldap
from ldap.filter import escape_filter_chars

from mailgate.auth import Identity
from mailgate.config import LdapConfig
from mailgate.errors import AuthUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
_NO_SUCH_ENTRY = "cn=mailgate-no-such-entry"  # bound to when the login is unknown (timing)
# Server answers that mean "not this password / not this entry", not "the server failed".
_WRONG_PASSWORD = (ldap.INVALID_CREDENTIALS, ldap.INAPPROPRIATE_AUTH, ldap.INVALID_DN_SYNTAX,
                   ldap.NO_SUCH_OBJECT, ldap.UNWILLING_TO_PERFORM)  # fmt: skip
# Errors after which a pooled connection is worth one retry on a fresh one.
_STALE = (ldap.SERVER_DOWN, ldap.CONNECT_ERROR)


class LdapBackend:
    name = "ldap"

    def __init__(self, cfg: LdapConfig, *, default_domain: str) -> None:
        self.cfg = cfg
        self.default_domain = default_domain
        self._bind_password = ""
        if cfg.bind_dn and cfg.bind_password_file is not None:
            lines = cfg.bind_password_file.read_text(encoding="utf-8").splitlines()
            self._bind_password = lines[0] if lines else ""
        self._threads = ThreadPoolExecutor(max_workers=cfg.pool_size, thread_name_prefix="ldap")
        self._lock = threading.Lock()
        self._idle: dict[str, list[Any]] = {"search": [], "bind": []}
        self._attributes = [cfg.address_attribute, *cfg.alias_attributes]
        # A deadline for the whole check: search and bind, each possibly a connect, a
        # StartTLS and one retry, plus waiting for a free thread.
        self._deadline = cfg.timeout * 6

    # --- the Backend interface (event loop side) ------------------------------------------

    async def verify(self, login: str, password: str) -> Identity | None:
        return await self._run(self._verify, login, password)

    async def lookup(self, login: str) -> Identity | None:
        return await self._run(self._lookup, login)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            idle = [c for pool in self._idle.values() for c in pool]
            for pool in self._idle.values():
                pool.clear()
        for conn in idle:
            _unbind(conn)

    async def _run(self, function: Callable[..., T], *args: str) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(self._threads, function, *args), self._deadline
            )
        except TimeoutError:
            raise AuthUnavailable(
                f"{self.cfg.url}: no answer within {self._deadline:.0f}s"
            ) from None
        except ldap.LDAPError as e:
            raise AuthUnavailable(f"{self.cfg.url}: {_describe(e)}") from None

    # --- one check (on a pool thread) ---------------------------------------------------------

    def _verify(self, login: str, password: str) -> Identity | None:
        entry = self._find(login)
        if entry is None:
            self._bind_as(f"{_NO_SUCH_ENTRY},{self.cfg.base}", password)  # same cost as a miss
            return None
        dn, attributes = entry
        if not self._bind_as(dn, password):
            return None
        return self._identity(login, attributes)

    def _lookup(self, login: str) -> Identity | None:
        entry = self._find(login)
        return None if entry is None else self._identity(login, entry[1])

    def _find(self, login: str) -> tuple[str, dict[str, list[bytes]]] | None:
        search_filter = self.cfg.filter.replace("{login}", escape_filter_chars(login))
        try:
            results = self._with_connection("search", lambda conn: conn.search_ext_s(
                self.cfg.base, ldap.SCOPE_SUBTREE, search_filter, self._attributes,
                sizelimit=2, timeout=self.cfg.timeout,
            ))  # fmt: skip
        except ldap.NO_SUCH_OBJECT:  # the base itself does not exist: nobody matches
            return None
        except ldap.SIZELIMIT_EXCEEDED:
            results = [("", {}), ("", {})]
        entries = [(str(dn), attrs) for dn, attrs in results if dn is not None]  # not referrals
        if len(entries) > 1:
            log.warning("ldap filter matches several entries login=%r: refused", login[:100])
        return entries[0] if len(entries) == 1 else None

    def _bind_as(self, dn: str, password: str) -> bool:
        """True when the server accepts `password` for `dn` (a simple bind)."""
        try:
            self._with_connection("bind", lambda conn: conn.simple_bind_s(dn, password))
        except _WRONG_PASSWORD:
            return False
        return True

    def _identity(self, login: str, attributes: dict[str, list[bytes]]) -> Identity:
        def values(name: str) -> list[str]:
            for key, items in attributes.items():  # attribute names ignore case (RFC 4512)
                if key.lower() == name.lower():
                    found = (_address(v.decode("utf-8", "replace")) for v in items)
                    return [a for a in found if a]
            return []

        primary = values(self.cfg.address_attribute) or [f"{login}@{self.default_domain}"]
        aliases = [a for name in self.cfg.alias_attributes for a in values(name)]
        return Identity(login=login, addresses=tuple(dict.fromkeys([*primary, *aliases])))

    # --- the pool -----------------------------------------------------------------------------

    def _with_connection(self, kind: str, operation: Callable[[Any], T]) -> T:
        """Run `operation` on an idle connection of `kind` ("search": bound as the service
        account; "bind": for user binds), or on a new one. A pooled connection that the server
        closed (a restart) is replaced once."""
        with self._lock:
            conn = self._idle[kind].pop() if self._idle[kind] else None
        if conn is not None:
            try:
                return self._use(kind, conn, operation)
            except _STALE:
                pass
        return self._use(kind, self._connect(bind_as_service=kind == "search"), operation)

    def _use(self, kind: str, conn: Any, operation: Callable[[Any], T]) -> T:
        """`operation(conn)`; the connection goes back to the pool unless it failed."""
        try:
            result = operation(conn)
        except _WRONG_PASSWORD:
            self._give_back(kind, conn)  # the connection is fine; the password was not
            raise
        except BaseException:
            _unbind(conn)
            raise
        self._give_back(kind, conn)
        return result

    def _give_back(self, kind: str, conn: Any) -> None:
        with self._lock:
            if len(self._idle[kind]) < self.cfg.pool_size:
                self._idle[kind].append(conn)
                return
        _unbind(conn)

    def _connect(self, *, bind_as_service: bool) -> Any:
        cfg = self.cfg
        conn = ldap.initialize(cfg.url)
        try:
            conn.set_option(ldap.OPT_PROTOCOL_VERSION, ldap.VERSION3)
            conn.set_option(ldap.OPT_REFERRALS, 0)  # never follow a referral elsewhere
            conn.set_option(ldap.OPT_NETWORK_TIMEOUT, cfg.timeout)
            conn.set_option(ldap.OPT_TIMEOUT, cfg.timeout)
            conn.timeout = cfg.timeout  # python-ldap's own bound on every synchronous call
            if cfg.starttls or cfg.url.startswith("ldaps://"):
                conn.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
                if cfg.ca_file is not None:
                    conn.set_option(ldap.OPT_X_TLS_CACERTFILE, str(cfg.ca_file))
                conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)  # after every TLS option
            if cfg.starttls:
                conn.start_tls_s()
            if bind_as_service and cfg.bind_dn:
                conn.simple_bind_s(cfg.bind_dn, self._bind_password)
        except ldap.INVALID_CREDENTIALS:
            _unbind(conn)
            # The service account's password is wrong: the operator's problem, not the user's.
            raise ldap.OTHER(
                {"desc": "bind_dn: invalid credentials for the service account"}
            ) from None
        except BaseException:
            _unbind(conn)
            raise
        return conn


def _address(value: str) -> str:
    """An address from an attribute value: as it is, or without Active Directory's "smtp:"
    prefix (proxyAddresses); other typed values ("X500:...", "sip:...") are not addresses."""
    kind, colon, rest = value.partition(":")
    if colon and "@" not in kind:
        return rest if kind.lower() == "smtp" and "@" in rest else ""
    return value if "@" in value else ""


def _unbind(conn: Any) -> None:
    with contextlib.suppress(ldap.LDAPError):
        conn.unbind_s()


def _describe(error: ldap.LDAPError) -> str:
    """One line for the log: libldap's description and its diagnostic, never a password."""
    info = error.args[0] if error.args and isinstance(error.args[0], dict) else {}
    text = str(info.get("desc", type(error).__name__))
    if info.get("info"):
        text += f" ({info['info']})"
    return text.replace("\n", " ")[:300]

"""The directory's logic in SQL, shared by the SQLite and PostgreSQL backends.

Owns: every query and rule of `mailgate.directory.Directory` (users, passwords, domains, DKIM
key rows, grants, the generation counter) and the migration runner, written once in the SQL
both databases accept (`?` placeholders, `ON CONFLICT DO NOTHING`, case-insensitive columns:
COLLATE NOCASE in SQLite, citext in PostgreSQL). A backend supplies connections and
transactions (`_write`, `_read`, `_query_one`, `_migration`) and maps its driver's errors to
DirectoryError (DirectoryUnavailable when the database cannot be reached).
Must not: know about SMTP, create or read DKIM key material (key files are made by
message/dkimkeys.py; the directory stores their paths), or log passwords.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

from mailgate.directory import AppPassword, User, migrate, passwords
from mailgate.directory.names import (
    DKIM_ALGORITHMS,
    WILDCARD_LOCAL,
    check_login,
    check_password,
    check_selector,
    normalize_address,
    normalize_domain,
)
from mailgate.dnsname import MANAGED_DOMAIN_LABELS
from mailgate.errors import DirectoryError
from mailgate.values import DkimKey, Domain

log = logging.getLogger(__name__)

# password_hash of an account whose password another [auth] backend checks: not a PHC string,
# so passwords.verify_password() is False for every password.
EXTERNAL_PASSWORD = "!external"  # noqa: S105 - a marker, not a password
_SET_FLAG = {
    "enabled": "UPDATE users SET enabled = ? WHERE login = ?",
    "suspended": "UPDATE users SET suspended = ? WHERE login = ?",
}
# What `copy_to` copies, parents before children. A migration that adds a table adds it here
# (and a boolean column to _BOOLEAN_COLUMNS: SQLite stores 0/1, PostgreSQL wants a boolean).
COPIED_TABLES = ("users", "domains", "dkim_keys", "grants", "app_passwords")
_BOOLEAN_COLUMNS = frozenset({"enabled", "suspended", "active"})
_SCHEMA_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"

# A row: sqlite3.Row or psycopg's dict_row; both are read by column name.
Row = Any


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class Db(Protocol):
    """One connection inside a transaction, as the queries below use it."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Any: ...


class SqlDirectory:
    """Users, managed domains, DKIM key rows and grants in an SQL database.

    default_domain: primary addresses default to LOGIN@default_domain (done by the CLI); the
                    default domain is always managed.
    data_dir:       the data folder; relative DKIM key paths are relative to it.
    """

    dialect: str  # "sqlite" or "postgresql": which migrations apply
    label: str  # names the database in error messages (a path, or a URL without password)

    def __init__(self, *, default_domain: str, data_dir: Path) -> None:
        self.default_domain = normalize_domain(default_domain)
        self.data_dir = Path(data_dir)

    # --- what a backend supplies ---------------------------------------------------------

    def close(self) -> None:
        raise NotImplementedError

    def _write(self) -> contextlib.AbstractContextManager[Db]:
        """One write transaction."""
        raise NotImplementedError

    def _read(self) -> contextlib.AbstractContextManager[Db]:
        """A read transaction: several queries see one snapshot."""
        raise NotImplementedError

    def _query_one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        raise NotImplementedError

    def _migration(self) -> contextlib.AbstractContextManager[Db]:
        """The transaction a migration runs in, holding a lock other migrators wait for."""
        raise NotImplementedError

    def _run_script(self, db: Db, sql: str) -> None:
        """Run a migration script (several statements) inside the migration transaction."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def sync(self) -> None:
        """Every read goes to the database: nothing to catch up with."""

    # --- schema ------------------------------------------------------------------------

    def schema_version(self) -> int | None:
        """The version recorded in the database, or None when it has no schema yet."""
        with self._read() as db:
            return self._version(db)

    def _version(self, db: Db) -> int | None:
        if not self._has_schema_table(db):
            return None
        row = db.execute("SELECT max(version) AS version FROM schema_version").fetchone()
        return None if row["version"] is None else int(row["version"])

    def _has_schema_table(self, db: Db) -> bool:
        raise NotImplementedError

    def migrate(self) -> list[str]:
        """Apply every migration above the database's version; the names of those applied.

        Idempotent: on a current database it changes nothing and returns [].
        """
        applied: list[str] = []
        with self._migration() as db:
            db.execute(_SCHEMA_VERSION_TABLE)
            current = self._version(db) or 0
            self._refuse_newer(current)
            for step in migrate.pending(self.dialect, current):
                self._run_script(db, step.sql)
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (step.version,))
                applied.append(step.name)
                log.info("directory migrated to version=%d step=%s", step.version, step.name)
        return applied

    def check_schema(self) -> None:
        """DirectoryError unless the database's schema is the one this mailgate uses."""
        version = self.schema_version()
        self._refuse_newer(version or 0)
        if version != migrate.latest(self.dialect):
            raise DirectoryError(
                f"{self.label}: database schema version {version or 0}, this mailgate uses "
                f"version {migrate.latest(self.dialect)}: run `mailgate directory migrate`"
            )

    def copy_to(self, target: SqlDirectory) -> dict[str, int]:
        """Copy every row of COPIED_TABLES into `target`, which must be empty; rows per table.

        Password hashes are copied as they are (nobody's password changes). One read
        transaction here, one write transaction there: a failure leaves the target empty.
        """
        target.migrate()
        with self._read() as src:
            tables = {t: [dict(r) for r in src.execute(_sql("SELECT * FROM {}", t)).fetchall()]
                      for t in COPIED_TABLES}  # fmt: skip
        with target._write() as dst:
            for table in COPIED_TABLES:
                row = dst.execute(_sql("SELECT count(*) AS n FROM {}", table)).fetchone()
                if row["n"]:
                    raise DirectoryError(
                        f"{target.label}: table {table} already has {row['n']} rows; "
                        "copy only into an empty directory"
                    )
            for table, rows in tables.items():
                for values in rows:
                    marks = ", ".join("?" for _ in values)
                    insert = _sql(
                        "INSERT INTO {} ({}) VALUES ({})", table, ", ".join(values), marks
                    )
                    params = [bool(v) if k in _BOOLEAN_COLUMNS else v for k, v in values.items()]
                    dst.execute(insert, params)
        return {table: len(rows) for table, rows in tables.items()}

    def _refuse_newer(self, version: int) -> None:
        if version > migrate.latest(self.dialect):
            raise DirectoryError(
                f"{self.label}: database schema version {version}, this "
                f"mailgate understands version {migrate.latest(self.dialect)}"
            )

    # --- users ---------------------------------------------------------------------

    def add_user(self, login: str, address: str, password: str) -> User:
        check_login(login)
        primary = normalize_address(address)
        # Hash before taking the write lock: argon2 takes tens of milliseconds.
        password_hash = passwords.hash_password(check_password(password))
        with self._write() as db:
            if db.execute("SELECT 1 FROM users WHERE login = ?", (login,)).fetchone():
                raise DirectoryError(f"login {login!r} already exists")
            db.execute(
                "INSERT INTO users (login, address, password_hash) VALUES (?, ?, ?)",
                (login, primary, password_hash),
            )
        return User(login=login, address=primary)

    def ensure_account(self, login: str, address: str) -> bool:
        """A users row without a password (EXTERNAL_PASSWORD) for a login that another
        [auth] backend (LDAP, Dovecot) authenticates: it holds the login's grants, app
        passwords and enabled/suspended flags. False when the login already has a row."""
        check_login(login)
        primary = normalize_address(address)
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO users (login, address, password_hash) VALUES (?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (login, primary, EXTERNAL_PASSWORD),
            )
            return bool(cur.rowcount > 0)

    # --- app passwords (migration 0002) ----------------------------------------------

    def add_app_password(self, login: str, name: str, secret_hash: str) -> AppPassword:
        created = dt.datetime.now(dt.UTC).replace(microsecond=0)
        with self._write() as db:
            user = db.execute("SELECT login FROM users WHERE login = ?", (login,)).fetchone()
            if user is None:
                raise DirectoryError(f"unknown login {login!r}")
            if db.execute("SELECT 1 FROM app_passwords WHERE login = ? AND name = ?",
                          (login, name)).fetchone():  # fmt: skip
                raise DirectoryError(f"{login!r} already has an app password {name!r}")
            db.execute(
                "INSERT INTO app_passwords (login, name, secret_hash, created_at)"
                " VALUES (?, ?, ?, ?)",
                (user["login"], name, secret_hash, created.isoformat()),
            )
        return AppPassword(login=str(user["login"]), name=name, created_at=created)

    def list_app_passwords(self, login: str | None = None) -> list[AppPassword]:
        sql = "SELECT login, name, created_at, last_used_at FROM app_passwords"
        with self._read() as db:
            if login is None:
                rows = db.execute(sql + " ORDER BY login, name").fetchall()
            else:
                rows = db.execute(sql + " WHERE login = ? ORDER BY name", (login,)).fetchall()
        return [_app_password(row) for row in rows]

    def remove_app_password(self, login: str, name: str) -> None:
        with self._write() as db:
            cur = db.execute(
                "DELETE FROM app_passwords WHERE login = ? AND name = ?", (login, name)
            )
            if cur.rowcount == 0:
                raise DirectoryError(f"{login!r} has no app password {name!r}")

    def use_app_password(self, login: str, secret_hash: str) -> str | None:
        """The name of `login`'s app password with this hash, recording its use; else None.
        (The hash is of a 99-bit random secret: an indexed equality look-up is safe.)"""
        row = self._query_one(
            "SELECT name FROM app_passwords WHERE login = ? AND secret_hash = ?",
            (login, secret_hash),
        )
        if row is None:
            return None
        now = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
        try:
            with self._write() as db:
                db.execute(
                    "UPDATE app_passwords SET last_used_at = ? WHERE login = ? AND name = ?",
                    (now, login, row["name"]),
                )
        except DirectoryError as e:  # a busy database must not fail the login
            log.warning("app password last use not recorded login=%s error=%s", login, e)
        return str(row["name"])

    def set_password(self, login: str, password: str) -> None:
        password_hash = passwords.hash_password(check_password(password))
        with self._write() as db:
            cur = db.execute(
                "UPDATE users SET password_hash = ? WHERE login = ?", (password_hash, login)
            )
            if cur.rowcount == 0:
                raise DirectoryError(f"unknown login {login!r}")

    def set_enabled(self, login: str, enabled: bool) -> None:
        self._set_flag(login, "enabled", enabled)

    def set_suspended(self, login: str, suspended: bool) -> None:
        self._set_flag(login, "suspended", suspended)

    def _set_flag(self, login: str, column: str, value: bool) -> None:
        with self._write() as db:
            cur = db.execute(_SET_FLAG[column], (value, login))
            if cur.rowcount == 0:
                raise DirectoryError(f"unknown login {login!r}")

    def remove_user(self, login: str) -> None:
        with self._write() as db:
            # Their grants go too (ON DELETE CASCADE).
            if db.execute("DELETE FROM users WHERE login = ?", (login,)).rowcount == 0:
                raise DirectoryError(f"unknown login {login!r}")

    def get_user(self, login: str) -> User | None:
        row = self._query_one(
            "SELECT login, address, enabled, suspended FROM users WHERE login = ?", (login,)
        )
        return None if row is None else _user(row)

    def list_users(self) -> list[User]:
        with self._read() as db:
            rows = db.execute(
                "SELECT login, address, enabled, suspended FROM users ORDER BY login"
            ).fetchall()
        return [_user(row) for row in rows]

    def verify_password(self, login: str, password: str) -> User | None:
        """The user if the login exists, is enabled and not suspended, and the password matches.

        Every path verifies exactly one argon2 hash (the dummy one for an unknown login), so
        the time taken does not reveal whether a login exists or is disabled.
        """
        row = self._query_one(
            "SELECT login, address, enabled, suspended, password_hash FROM users WHERE login = ?",
            (login,),
        )
        if row is None or row["password_hash"] == EXTERNAL_PASSWORD:
            passwords.verify_dummy(password)  # an account without a password here: no login
            return None
        stored_hash: str = row["password_hash"]
        if not passwords.verify_password(stored_hash, password):
            return None
        user = _user(row)
        if not user.enabled or user.suspended:
            return None
        if passwords.needs_rehash(stored_hash):
            self._rehash(user.login, stored_hash, password)
        return user

    def _rehash(self, login: str, old_hash: str, password: str) -> None:
        """Upgrade a hash made with older parameters; a failure must not fail the login."""
        new_hash = passwords.hash_password(password)
        try:
            with self._write() as db:
                # Only if nobody changed the password meanwhile.
                db.execute(
                    "UPDATE users SET password_hash = ? WHERE login = ? AND password_hash = ?",
                    (new_hash, login, old_hash),
                )
        except DirectoryError as e:
            log.warning("rehash failed login=%s error=%s", login, e)

    # --- domains and keys ------------------------------------------------------------

    def add_domain(self, name: str) -> Domain:
        domain = normalize_domain(name, min_labels=MANAGED_DOMAIN_LABELS)
        with self._write() as db:
            if db.execute("SELECT 1 FROM domains WHERE name = ?", (domain,)).fetchone():
                raise DirectoryError(f"domain {domain} already exists")
            db.execute("INSERT INTO domains (name) VALUES (?)", (domain,))
        return Domain(name=domain)

    def remove_domain(self, name: str) -> None:
        """Remove the domain, its grants and its key rows. Its key files are the caller's to set
        aside (message.dkimkeys.set_aside, `mailgate domain remove`)."""
        domain = normalize_domain(name)
        with self._write() as db:
            if db.execute("DELETE FROM domains WHERE name = ?", (domain,)).rowcount == 0:
                raise DirectoryError(f"unknown domain {domain}")
            # LIKE is safe here: a normalized domain has no % or _ in it.
            db.execute("DELETE FROM grants WHERE address LIKE ?", (f"%@{domain}",))

    def get_domain(self, name: str) -> Domain | None:
        try:
            domain = normalize_domain(name)
        except DirectoryError:
            return None
        with self._read() as db:
            row = db.execute(
                "SELECT name, smarthost_networks FROM domains WHERE name = ?", (domain,)
            ).fetchone()
            if row is None:
                return None
            keys = db.execute(
                "SELECT * FROM dkim_keys WHERE domain = ? ORDER BY selector", (domain,)
            ).fetchall()
        return self._domain(row, keys)

    def list_domains(self) -> list[Domain]:
        with self._read() as db:
            rows = db.execute("SELECT name, smarthost_networks FROM domains ORDER BY name")
            domains = rows.fetchall()
            keys = db.execute("SELECT * FROM dkim_keys ORDER BY domain, selector").fetchall()
        by_domain: dict[str, list[Row]] = {}
        for key in keys:
            by_domain.setdefault(key["domain"].lower(), []).append(key)
        return [self._domain(row, by_domain.get(row["name"].lower(), [])) for row in domains]

    def _domain(self, row: Row, keys: list[Row]) -> Domain:
        return Domain(
            name=row["name"],
            keys=tuple(
                DkimKey(
                    selector=k["selector"],
                    algorithm=k["algorithm"],
                    key_path=self._key_path(k["key_path"]),
                    public_key_b64=k["public_key_b64"],
                    active=bool(k["active"]),
                )
                for k in keys
            ),
            smarthost_networks=tuple(json.loads(row["smarthost_networks"])),
        )

    def _key_path(self, stored: str) -> Path:
        path = Path(stored)
        return path if path.is_absolute() else self.data_dir / path

    def add_dkim_key(self, domain: str, key: DkimKey) -> None:
        name = normalize_domain(domain)
        selector = check_selector(key.selector)
        if key.algorithm not in DKIM_ALGORITHMS:
            raise DirectoryError(f"unknown DKIM algorithm {key.algorithm!r}")
        with self._write() as db:
            if not db.execute("SELECT 1 FROM domains WHERE name = ?", (name,)).fetchone():
                raise DirectoryError(f"unknown domain {name}")
            if db.execute(
                "SELECT 1 FROM dkim_keys WHERE domain = ? AND selector = ?", (name, selector)
            ).fetchone():
                raise DirectoryError(f"domain {name} already has a DKIM key {selector!r}")
            db.execute(
                "INSERT INTO dkim_keys (domain, selector, algorithm, key_path, public_key_b64,"
                " active) VALUES (?, ?, ?, ?, ?, ?)",
                (name, selector, key.algorithm, str(key.key_path), key.public_key_b64,
                 key.active),
            )  # fmt: skip

    def set_dkim_key_active(self, domain: str, selector: str, active: bool) -> None:
        name = normalize_domain(domain)
        with self._write() as db:
            cur = db.execute(
                "UPDATE dkim_keys SET active = ? WHERE domain = ? AND selector = ?",
                (active, name, selector),
            )
            if cur.rowcount == 0:
                raise DirectoryError(f"domain {name} has no DKIM key {selector!r}")

    def remove_dkim_key(self, domain: str, selector: str) -> None:
        """Forget the key row; the key file is left where it is (its owner decides)."""
        name = normalize_domain(domain)
        with self._write() as db:
            cur = db.execute(
                "DELETE FROM dkim_keys WHERE domain = ? AND selector = ?", (name, selector)
            )
            if cur.rowcount == 0:
                raise DirectoryError(f"domain {name} has no DKIM key {selector!r}")

    def set_smarthost_networks(self, domain: str, networks: Sequence[str]) -> None:
        """Replace the networks whose smart-host mail From: `domain` may be DKIM-signed.

        Not in the Directory protocol (only the domain commands set it); get_domain() returns
        the list as Domain.smarthost_networks.
        """
        name = normalize_domain(domain)
        normalized: list[str] = []
        for net in networks:
            try:
                normalized.append(str(ipaddress.ip_network(net, strict=False)))
            except ValueError:
                raise DirectoryError(f"{net!r} is not an IP network") from None
        with self._write() as db:
            cur = db.execute(
                "UPDATE domains SET smarthost_networks = ? WHERE name = ?",
                (json.dumps(normalized), name),
            )
            if cur.rowcount == 0:
                raise DirectoryError(f"unknown domain {name}")

    # --- grants ----------------------------------------------------------------------

    def grant(self, address: str, login: str) -> None:
        """Let `login` send as `address`; address may be "*@domain" (domain-wide).

        The domain must be managed (the default domain or one added with add_domain):
        mailgate only vouches for senders in domains it manages. Granting twice is harmless.
        """
        normalized = normalize_address(address, wildcard=True)
        domain = normalized.rpartition("@")[2]
        with self._write() as db:
            user = db.execute("SELECT login FROM users WHERE login = ?", (login,)).fetchone()
            if user is None:
                raise DirectoryError(f"unknown login {login!r}")
            if not self._is_managed(db, domain):
                raise DirectoryError(
                    f"{domain} is not a managed domain (add it with: mailgate domain add {domain})"
                )
            db.execute(
                "INSERT INTO grants (address, login) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (normalized, user["login"]),
            )

    def revoke(self, address: str, login: str | None = None) -> None:
        """Remove the grant of `address` to `login`, or to everybody when login is None."""
        normalized = normalize_address(address, wildcard=True)
        with self._write() as db:
            if login is None:
                cur = db.execute("DELETE FROM grants WHERE address = ?", (normalized,))
                if cur.rowcount == 0:
                    raise DirectoryError(f"{normalized} is not granted to anyone")
            else:
                cur = db.execute(
                    "DELETE FROM grants WHERE address = ? AND login = ?", (normalized, login)
                )
                if cur.rowcount == 0:
                    raise DirectoryError(f"{normalized} is not granted to {login!r}")

    def list_grants(self, owner: str | None = None) -> list[tuple[str, str]]:
        """(address, login) pairs, sorted."""
        with self._read() as db:
            if owner is None:
                rows = db.execute("SELECT address, login FROM grants").fetchall()
            else:
                rows = db.execute(
                    "SELECT address, login FROM grants WHERE login = ?", (owner,)
                ).fetchall()
        return sorted((row["address"], row["login"]) for row in rows)

    # --- policy questions --------------------------------------------------------------

    def is_managed(self, domain: str) -> bool:
        """True for the default domain and every managed domain."""
        try:
            name = normalize_domain(domain)
        except DirectoryError:
            return False
        if name == self.default_domain:
            return True
        return self._query_one("SELECT 1 FROM domains WHERE name = ?", (name,)) is not None

    def _is_managed(self, db: Db, domain: str) -> bool:
        if domain == self.default_domain:
            return True
        return db.execute("SELECT 1 FROM domains WHERE name = ?", (domain,)).fetchone() is not None

    def may_send_as(self, login: str, address: str) -> bool:
        """The user's primary address, an exact grant, or a domain-wide grant."""
        try:
            normalized = normalize_address(address)
        except DirectoryError:
            return False  # the null sender, or nothing anybody could own
        wildcard = f"{WILDCARD_LOCAL}@{normalized.rpartition('@')[2]}"
        row = self._query_one(
            "SELECT 1 FROM users WHERE login = ? AND address = ?"
            " UNION ALL SELECT 1 FROM grants WHERE login = ? AND address IN (?, ?)",
            (login, normalized, login, normalized, wildcard),
        )
        return row is not None

    def generation(self) -> int:
        """A number that changes whenever users, passwords, grants, domains or keys change."""
        row = self._query_one("SELECT value FROM generation WHERE id = 1")
        return 0 if row is None else int(row["value"])


def _sql(template: str, *names: str) -> str:
    """A statement naming our own tables and columns (never input): `template` filled in."""
    return template.format(*names)


def _app_password(row: Row) -> AppPassword:
    last = row["last_used_at"]
    return AppPassword(
        login=str(row["login"]), name=str(row["name"]),
        created_at=dt.datetime.fromisoformat(row["created_at"]),
        last_used_at=None if last is None else dt.datetime.fromisoformat(last),
    )  # fmt: skip


def _user(row: Row) -> User:
    return User(
        login=row["login"],
        address=row["address"],
        enabled=bool(row["enabled"]),
        suspended=bool(row["suspended"]),
    )

"""The directory on SQLite: `SqliteDirectory` implements `mailgate.directory.Directory`.

Owns: the database file (schema in schema.sql, shipped as package data), address and login
validation, the credential check (argon2id via directory/passwords.py) and moving a removed
domain's key files aside. Must not: know about SMTP, create or read DKIM key material (key
files are made by message/dkimkeys.py; the directory stores their paths), or log passwords.

Concurrency: the server verifies passwords through `asyncio.to_thread` from several worker
threads while `mailgate user ...` may write from another process. Each thread gets its own
connection (sqlite3 connections must not be shared between threads in use); the database is
in WAL mode so readers never wait for a writer, and writers take the lock up front
(BEGIN IMMEDIATE) and wait up to BUSY_TIMEOUT for each other.

Addresses (RFC 5321 §4.1.2, RFC 5322 §3.4.1): `local@domain` with a dot-atom local part
(UTF-8 allowed, RFC 6531) and an LDH domain (RFC 1035 §2.3.1, A-labels for IDNs). The domain
is stored lower-case, the local part as given; every comparison ignores ASCII case.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import shutil
import sqlite3
import string
import threading
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any

from mailgate.directory import DkimKey, Domain, User, passwords
from mailgate.errors import DirectoryError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BUSY_TIMEOUT = 10.0  # seconds a writer waits for another writer (CLI vs. server)
MAX_LOGIN_LENGTH = 255
MAX_PASSWORD_LENGTH = 1024
DKIM_ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
WILDCARD_LOCAL = "*"  # "*@domain": every address of the domain (a domain-wide grant)
_MAX_RENAME_ATTEMPTS = 1000
# password_hash of an account whose password another [auth] backend checks: not a PHC string,
# so passwords.verify_password() is False for every password.
EXTERNAL_PASSWORD = "!external"  # noqa: S105 - a marker, not a password
_SET_FLAG = {
    "enabled": "UPDATE users SET enabled = ? WHERE login = ?",
    "suspended": "UPDATE users SET suspended = ? WHERE login = ?",
}

# RFC 5322 §3.2.3 atext; "." separates atoms (dot-atom).
_ATEXT = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~")
_LDH = frozenset(string.ascii_lowercase + string.digits + "-")


# --- validation ----------------------------------------------------------------


def normalize_domain(name: str) -> str:
    """`name` lower-cased without a trailing dot; DirectoryError unless it is an LDH domain."""
    if not isinstance(name, str) or not name.isascii():
        raise DirectoryError(f"{name!r} is not a valid domain name (use the xn-- form for IDNs)")
    domain = name.lower().removesuffix(".")
    # RFC 1035 §2.3.4: 63 octets per label, 255 in all (253 in text form).
    if not domain or len(domain) > 253:
        raise DirectoryError(f"{name!r} is not a valid domain name")
    for label in domain.split("."):
        if not 0 < len(label) <= 63 or label[0] == "-" or label[-1] == "-":
            raise DirectoryError(f"{name!r} is not a valid domain name")
        if not _LDH.issuperset(label):
            raise DirectoryError(f"{name!r} is not a valid domain name")
    return domain


def normalize_address(address: str, *, wildcard: bool = False) -> str:
    """`local@domain` with the domain lower-cased; DirectoryError naming the address if invalid.

    With `wildcard`, "*@domain" (a domain-wide grant) is accepted as well.
    """
    if not isinstance(address, str) or "@" not in address:
        raise DirectoryError(f"invalid address {address!r}: expected local@domain")
    local, _, domain_text = address.rpartition("@")
    try:
        domain = normalize_domain(domain_text)
    except DirectoryError:
        raise DirectoryError(f"invalid address {address!r}: bad domain") from None
    if local == WILDCARD_LOCAL:
        if not wildcard:
            raise DirectoryError(f"invalid address {address!r}: '*@' is only for grants")
        return f"{WILDCARD_LOCAL}@{domain}"
    # RFC 5321 §4.5.3.1.1: 64 octets per local part. Quoted local parts are not supported:
    # nobody needs one as a sender address, and they make comparisons ambiguous.
    if not local or len(local.encode("utf-8")) > 64:
        raise DirectoryError(f"invalid address {address!r}: bad local part")
    if any(not atom for atom in local.split(".")):
        raise DirectoryError(f"invalid address {address!r}: bad local part")
    for ch in local:
        if ch != "." and ch not in _ATEXT and not (ord(ch) > 127 and ch.isprintable()):
            raise DirectoryError(f"invalid address {address!r}: bad local part")
    return f"{local}@{domain}"


def check_login(login: str) -> str:
    """`login` itself if acceptable as an AUTH identity: printable, no spaces, not too long."""
    if (
        not isinstance(login, str)
        or not login
        or len(login) > MAX_LOGIN_LENGTH
        or any(ch.isspace() or not ch.isprintable() for ch in login)
    ):
        raise DirectoryError(
            f"invalid login {login!r}: expected 1-255 printable characters, no spaces"
        )
    return login


def check_password(password: str) -> str:
    """`password` itself if it can be stored: not empty, one line, no NUL (SASL PLAIN, RFC 4616)."""
    if not password:
        raise DirectoryError("the password is empty")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise DirectoryError(f"the password is longer than {MAX_PASSWORD_LENGTH} characters")
    if any(ch in "\0\r\n" for ch in password):
        raise DirectoryError("the password contains a NUL or line break")
    return password


def _check_selector(selector: str) -> str:
    # RFC 6376 §3.1: a selector is a sub-domain (dot-separated labels).
    try:
        return normalize_domain(selector)
    except DirectoryError:
        raise DirectoryError(f"invalid DKIM selector {selector!r}") from None


# --- the directory ---------------------------------------------------------------


class SqliteDirectory:
    """Users, managed domains, DKIM key rows and grants in one SQLite file.

    path:           the database file; created (0600) with its schema if missing. Its folder
                    must exist.
    default_domain: primary addresses default to LOGIN@default_domain (done by the CLI); the
                    default domain is always managed.
    data_dir:       the data folder; relative DKIM key paths are relative to it, and
                    remove_domain() moves key files from <data_dir>/dkim/ to dkim/removed/.
    """

    def __init__(self, path: Path, *, default_domain: str, data_dir: Path) -> None:
        self.path = Path(path)
        self.default_domain = normalize_domain(default_domain)
        self.data_dir = Path(data_dir)
        self._local = threading.local()
        self._lock = threading.Lock()  # guards _connections
        self._connections: list[sqlite3.Connection] = []
        try:
            self._create_schema()
        except BaseException:
            self.close()
            raise

    # --- connections and transactions ----------------------------------------------

    def close(self) -> None:
        """Close every thread's connection. Call when no other thread uses the directory."""
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
            self._local = threading.local()

    def __enter__(self) -> SqliteDirectory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _db(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _connect(self) -> sqlite3.Connection:
        try:
            if not self.path.exists():
                # The file holds password hashes: create it private before SQLite does (with
                # the umask). SQLite gives its -wal and -shm files the same permissions.
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError as e:
            raise DirectoryError(f"{self.path}: cannot create the database: {e.strerror}") from None
        try:
            # One connection per thread (see the module docstring); check_same_thread is off
            # only so that close() may close them all from the thread that owns the directory.
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                   check_same_thread=False)  # fmt: skip
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys = ON")
            # Accounts are few and rarely change: every commit durable, even on power loss.
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as e:
            raise DirectoryError(f"{self.path}: cannot open the database: {e}") from None
        return conn

    def _create_schema(self) -> None:
        db = self._db()
        try:
            version = self._schema_version(db)
            if version is None:
                # WAL must be set outside a transaction; it is a property of the file.
                if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    db.execute("PRAGMA journal_mode = WAL")
                script = (
                    resources.files("mailgate.directory").joinpath("schema.sql").read_text("utf-8")
                )
                db.executescript(f"BEGIN IMMEDIATE;\n{script}\nCOMMIT;")
                version = self._schema_version(db)
            if version != SCHEMA_VERSION:
                raise DirectoryError(
                    f"{self.path}: database schema version {version}, this mailgate "
                    f"understands version {SCHEMA_VERSION}"
                )
        except sqlite3.Error as e:
            if db.in_transaction:
                db.rollback()
            raise DirectoryError(f"{self.path}: cannot open the database: {e}") from None

    @staticmethod
    def _schema_version(db: sqlite3.Connection) -> int | None:
        has_table = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()
        if has_table is None:
            return None
        row = db.execute("SELECT max(version) FROM schema_version").fetchone()
        return None if row[0] is None else int(row[0])

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; the write lock is taken at once (no upgrade deadlocks)."""
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.rollback()
                raise
            db.execute("COMMIT")
        except sqlite3.Error as e:
            if db.in_transaction:
                db.rollback()
            raise DirectoryError(f"{self.path}: {e}") from None

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: several queries see one snapshot."""
        db = self._db()
        try:
            db.execute("BEGIN")
            try:
                yield db
            finally:
                db.rollback()
        except sqlite3.Error as e:
            raise DirectoryError(f"{self.path}: {e}") from None

    def _query_one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        try:
            row: sqlite3.Row | None = self._db().execute(sql, params).fetchone()
        except sqlite3.Error as e:
            raise DirectoryError(f"{self.path}: {e}") from None
        return row

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
                "INSERT OR IGNORE INTO users (login, address, password_hash) VALUES (?, ?, ?)",
                (login, primary, EXTERNAL_PASSWORD),
            )
            return cur.rowcount > 0

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
            cur = db.execute(_SET_FLAG[column], (int(value), login))
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
        domain = normalize_domain(name)
        with self._write() as db:
            if db.execute("SELECT 1 FROM domains WHERE name = ?", (domain,)).fetchone():
                raise DirectoryError(f"domain {domain} already exists")
            db.execute("INSERT INTO domains (name) VALUES (?)", (domain,))
        return Domain(name=domain)

    def remove_domain(self, name: str) -> None:
        """Remove the domain, its grants and its key rows; move its key files aside.

        Key files are kept (a key may still verify mail in transit): <data_dir>/dkim/<domain>/
        and any other key file of the domain under <data_dir>/dkim/ move to dkim/removed/.
        """
        domain = normalize_domain(name)
        with self._write() as db:
            keys = db.execute("SELECT key_path FROM dkim_keys WHERE domain = ?", (domain,))
            key_paths = [self._key_path(row["key_path"]) for row in keys.fetchall()]
            if db.execute("DELETE FROM domains WHERE name = ?", (domain,)).rowcount == 0:
                raise DirectoryError(f"unknown domain {domain}")
            # LIKE is safe here: a normalized domain has no % or _ in it.
            db.execute("DELETE FROM grants WHERE address LIKE ?", (f"%@{domain}",))
        # After the commit: if moving fails, the files merely stay where they were.
        try:
            self._move_key_files(domain, key_paths)
        except OSError as e:
            raise DirectoryError(
                f"domain {domain} removed, but its key files could not be moved aside: {e}"
            ) from None

    def _move_key_files(self, domain: str, key_paths: list[Path]) -> None:
        dkim_dir = (self.data_dir / "dkim").absolute()
        removed = dkim_dir / "removed"
        domain_dir = dkim_dir / domain
        sources: list[Path] = []
        if domain != removed.name and domain_dir.is_dir():
            sources.append(domain_dir)
        for path in key_paths:
            path = path.absolute()
            if (
                path.is_file()
                and path.is_relative_to(dkim_dir)
                and not path.is_relative_to(removed)
                and not path.is_relative_to(domain_dir)
            ):
                sources.append(path)
        if not sources:
            return
        removed.mkdir(mode=0o700, parents=True, exist_ok=True)
        for source in sources:
            target = _free_name(removed / source.name)
            shutil.move(source, target)
            log.info("dkim key moved aside domain=%s from=%s to=%s", domain, source, target)

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
        by_domain: dict[str, list[sqlite3.Row]] = {}
        for key in keys:
            by_domain.setdefault(key["domain"].lower(), []).append(key)
        return [self._domain(row, by_domain.get(row["name"].lower(), [])) for row in domains]

    def _domain(self, row: sqlite3.Row, keys: list[sqlite3.Row]) -> Domain:
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
        selector = _check_selector(key.selector)
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
                 int(key.active)),
            )  # fmt: skip

    def set_dkim_key_active(self, domain: str, selector: str, active: bool) -> None:
        name = normalize_domain(domain)
        with self._write() as db:
            cur = db.execute(
                "UPDATE dkim_keys SET active = ? WHERE domain = ? AND selector = ?",
                (int(active), name, selector),
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
                "INSERT OR IGNORE INTO grants (address, login) VALUES (?, ?)",
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
        try:
            return self._is_managed(self._db(), name)
        except sqlite3.Error as e:
            raise DirectoryError(f"{self.path}: {e}") from None

    def _is_managed(self, db: sqlite3.Connection, domain: str) -> bool:
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


def _user(row: sqlite3.Row) -> User:
    return User(
        login=row["login"],
        address=row["address"],
        enabled=bool(row["enabled"]),
        suspended=bool(row["suspended"]),
    )


def _free_name(target: Path) -> Path:
    """`target`, or target.1, target.2 ... whichever does not exist yet."""
    if not target.exists():
        return target
    for n in range(1, _MAX_RENAME_ATTEMPTS):
        candidate = target.with_name(f"{target.name}.{n}")
        if not candidate.exists():
            return candidate
    raise DirectoryError(f"{target}: too many removed copies; clean up {target.parent}")

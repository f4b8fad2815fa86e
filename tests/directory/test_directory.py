"""The directory suite, run on both backends: SQLite files in tmp_path and a fresh PostgreSQL
database per test (tests/support/databases.py). Users, passwords, domains, keys, grants,
migrations; the SQLite file's own properties at the end."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from mailgate.directory import Directory, User, migrate, open_url, passwords
from mailgate.directory.names import normalize_address, normalize_domain
from mailgate.directory.sql import SqlDirectory
from mailgate.directory.store import SqliteDirectory
from mailgate.errors import DirectoryError, DirectoryUnavailable
from mailgate.values import DkimKey, Domain
from tests.support.databases import closed_port_url, postgres_database, postgres_sql

DEFAULT = "example.org"


class Backend:
    """One database of either kind: open it (as often as a test likes) and poke it with SQL."""

    def __init__(self, url: str, data_dir: Path) -> None:
        self.url = url
        self.data_dir = data_dir

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite:///")

    def open(self) -> SqlDirectory:
        return open_url(self.url, default_domain=DEFAULT, data_dir=self.data_dir)

    def sql(self, query: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        if not self.is_sqlite:
            return postgres_sql(self.url, query, params)
        with sqlite3.connect(self.url.removeprefix("sqlite:///")) as db:
            rows = db.execute(query, params).fetchall()
        db.close()
        return rows


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield Backend(f"sqlite:///{tmp_path / 'state.db'}", tmp_path)
        return
    with postgres_database() as url:
        # A new database has no schema: `mailgate directory migrate` makes it.
        with pytest.raises(DirectoryError, match=r"run `mailgate directory migrate`$"):
            open_url(url, default_domain=DEFAULT, data_dir=tmp_path)
        with open_url(url, default_domain=DEFAULT, data_dir=tmp_path, check=False) as d:
            d.migrate()
        yield Backend(url, tmp_path)


@pytest.fixture
def d(backend: Backend) -> Iterator[SqlDirectory]:
    directory = backend.open()
    try:
        yield directory
    finally:
        directory.close()


def open_dir(tmp_path: Path) -> SqliteDirectory:
    return SqliteDirectory(tmp_path / "state.db", default_domain=DEFAULT, data_dir=tmp_path)


@pytest.fixture
def sqlite_d(tmp_path: Path) -> Iterator[SqliteDirectory]:
    with open_dir(tmp_path) as directory:
        yield directory


def key(
    selector: str = "mg20261128", path: str = "dkim/dept.example.org/mg20261128.key"
) -> DkimKey:
    return DkimKey(selector=selector, algorithm="rsa-sha256", key_path=Path(path),
                   public_key_b64="MIIBIjANBgkq")  # fmt: skip


# --- the file ------------------------------------------------------------------


def test_implements_the_directory_protocol(d: SqlDirectory) -> None:
    directory: Directory = d  # mypy --strict checks the protocol here
    assert directory.list_users() == []


def test_reopening_keeps_the_data(backend: Backend, d: SqlDirectory) -> None:
    d.add_user("alice", "alice@example.org", "secret")
    d.close()
    with backend.open() as again:
        assert again.get_user("alice") == User("alice", "alice@example.org")
        assert backend.sql("SELECT max(version) FROM schema_version") == [(migrate.latest(
            "sqlite" if backend.is_sqlite else "postgresql"),)]  # fmt: skip


def test_migrate_is_idempotent(backend: Backend, d: SqlDirectory) -> None:
    assert d.migrate() == []
    assert d.schema_version() == len(migrate.migrations(d.dialect))
    d.check_schema()
    assert len(backend.sql("SELECT version FROM schema_version")) == migrate.latest(d.dialect)


def test_a_newer_schema_is_refused(backend: Backend, d: SqlDirectory) -> None:
    d.close()
    backend.sql("UPDATE schema_version SET version = 7")
    with pytest.raises(DirectoryError, match=r": database schema version 7, this mailgate "
                       rf"understands version {migrate.latest(d.dialect)}$"):  # fmt: skip
        backend.open()


def test_both_dialects_have_the_same_steps() -> None:
    sqlite = [m.name for m in migrate.migrations("sqlite")]
    assert sqlite == [m.name for m in migrate.migrations("postgresql")]
    assert sqlite[0] == "0001_initial.sql"


def test_an_unreachable_postgresql_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(DirectoryUnavailable, match=r"^postgresql://postgres@127\.0\.0\.1:\d+/"
                       r"mailgate: cannot connect to the database$"):  # fmt: skip
        open_url(closed_port_url(), default_domain=DEFAULT, data_dir=tmp_path)


def test_new_database_is_private_wal_and_versioned(
    tmp_path: Path, sqlite_d: SqliteDirectory
) -> None:
    db_path = tmp_path / "state.db"
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        versions = db.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
        assert versions == [(v,) for v in range(1, migrate.latest("sqlite") + 1)]
        assert db.execute("SELECT value FROM generation").fetchall() == [(0,)]
    db.close()


def test_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "state.db").write_bytes(b"this is not sqlite\n" * 100)
    with pytest.raises(DirectoryError, match=r"state\.db: cannot open the database: file is not "
                       r"a database$"):  # fmt: skip
        open_dir(tmp_path)


def test_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DirectoryError, match=r"cannot create the database: No such file"):
        SqliteDirectory(tmp_path / "nope" / "state.db", default_domain=DEFAULT, data_dir=tmp_path)


def test_a_bad_default_domain(tmp_path: Path) -> None:
    with pytest.raises(DirectoryError, match=r"'exa mple\.org' is not a valid domain name"):
        SqliteDirectory(tmp_path / "state.db", default_domain="exa mple.org", data_dir=tmp_path)


# --- validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("alice@example.org", "alice@example.org"),
        ("Alice.Smith@Example.ORG", "Alice.Smith@example.org"),
        ("a+tag@example.org.", "a+tag@example.org"),
        ("o'brien@example.org", "o'brien@example.org"),
        ("jörg@example.org", "jörg@example.org"),
        ("x@localhost", "x@localhost"),
    ],
)
def test_valid_addresses(given: str, expected: str) -> None:
    assert normalize_address(given) == expected


@pytest.mark.parametrize(
    "given",
    ["", "alice", "@example.org", "alice@", "alice@@example.org", "al ice@example.org",
     ".alice@example.org", "alice.@example.org", "a..b@example.org", "<alice@example.org>",
     "alice@exa_mple.org", "alice@-example.org", "alice@example..org", "a\x00@example.org",
     "\"quoted\"@example.org", "x" * 65 + "@example.org", "alice@bücher.example",
     "*@example.org"],
)  # fmt: skip
def test_invalid_addresses(given: str) -> None:
    with pytest.raises(DirectoryError, match=r"^invalid address "):
        normalize_address(given)


def test_wildcard_addresses_only_where_allowed() -> None:
    assert normalize_address("*@Dept.Example.org", wildcard=True) == "*@dept.example.org"
    with pytest.raises(DirectoryError, match=r"'\*@' is only for grants"):
        normalize_address("*@example.org")
    # "*" is atext (RFC 5322 §3.2.3): only a local part of exactly "*" means "every address".
    assert normalize_address("**@example.org", wildcard=True) == "**@example.org"


def test_domains() -> None:
    assert normalize_domain("Dept.Example.ORG.") == "dept.example.org"
    assert normalize_domain("xn--bcher-kva.example") == "xn--bcher-kva.example"
    for bad in ("", ".", "a..b", "-a.org", "a-.org", "a b.org", "a" * 64 + ".org", "bücher.de"):
        with pytest.raises(DirectoryError):
            normalize_domain(bad)


# --- users -------------------------------------------------------------------------


def test_add_and_get_user(d: SqlDirectory) -> None:
    assert d.add_user("alice", "Alice@Example.org", "pw") == User("alice", "Alice@example.org")
    assert d.get_user("alice") == User("alice", "Alice@example.org", True, False)
    assert d.get_user("ALICE") == User("alice", "Alice@example.org", True, False)
    assert d.get_user("bob") is None


def test_duplicate_login_case_insensitive(d: SqlDirectory) -> None:
    d.add_user("alice", "alice@example.org", "pw")
    with pytest.raises(DirectoryError, match=r"^login 'Alice' already exists$"):
        d.add_user("Alice", "other@example.org", "pw")


@pytest.mark.parametrize("login", ["", "al ice", "tab\there", "x" * 256, "nul\x00"])
def test_invalid_logins(d: SqlDirectory, login: str) -> None:
    with pytest.raises(DirectoryError, match=r"^invalid login "):
        d.add_user(login, "a@example.org", "pw")


def test_invalid_address_or_password_on_add(d: SqlDirectory) -> None:
    with pytest.raises(DirectoryError, match=r"^invalid address 'alice'"):
        d.add_user("alice", "alice", "pw")
    with pytest.raises(DirectoryError, match=r"^the password is empty$"):
        d.add_user("alice", "alice@example.org", "")
    with pytest.raises(DirectoryError, match=r"^the password contains a NUL or line break$"):
        d.add_user("alice", "alice@example.org", "a\nb")
    with pytest.raises(DirectoryError, match=r"^the password is longer than 1024 characters$"):
        d.add_user("alice", "alice@example.org", "x" * 1025)
    assert d.list_users() == []


def test_list_users_sorted(d: SqlDirectory) -> None:
    for login in ("carol", "alice", "bob"):
        d.add_user(login, f"{login}@example.org", "pw")
    assert [u.login for u in d.list_users()] == ["alice", "bob", "carol"]


def test_verify_password(d: SqlDirectory) -> None:
    d.add_user("alice", "alice@example.org", "correct horse")
    assert d.verify_password("alice", "correct horse") == User("alice", "alice@example.org")
    assert d.verify_password("ALICE", "correct horse") == User("alice", "alice@example.org")
    assert d.verify_password("alice", "wrong") is None
    assert d.verify_password("nobody", "correct horse") is None
    assert d.verify_password("", "") is None


def test_every_login_costs_one_hash_known_or_not(
    d: SqlDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What keeps the time of an AUTH from telling whether a login exists: each path verifies
    # exactly one argon2 hash with the current parameters (the dummy one for an unknown login),
    # checked without a clock (tests/unit/test_passwords.py: the dummy hash's parameters).
    d.add_user("alice", "alice@example.org", "correct horse")
    d.add_user("bob", "bob@example.org", "battery staple")
    d.set_enabled("bob", False)
    verified: list[str] = []
    real = passwords.verify_password

    def spy(stored_hash: str, password: str) -> bool:
        verified.append(stored_hash)
        return real(stored_hash, password)

    monkeypatch.setattr(passwords, "verify_password", spy)
    for login in ("alice", "nobody", "bob"):
        verified.clear()
        assert d.verify_password(login, "wrong") is None
        assert len(verified) == 1, login
        assert (verified[0] == passwords.DUMMY_HASH) is (login == "nobody")


def test_disabled_and_suspended_users_cannot_log_in(d: SqlDirectory) -> None:
    d.add_user("alice", "alice@example.org", "pw")
    d.set_enabled("alice", False)
    assert d.get_user("alice") == User("alice", "alice@example.org", enabled=False)
    assert d.verify_password("alice", "pw") is None
    d.set_enabled("alice", True)
    d.set_suspended("alice", True)
    assert d.get_user("alice") == User("alice", "alice@example.org", suspended=True)
    assert d.verify_password("alice", "pw") is None
    d.set_suspended("alice", False)
    assert d.verify_password("alice", "pw") == User("alice", "alice@example.org")


def test_set_password(d: SqlDirectory) -> None:
    d.add_user("alice", "alice@example.org", "old")
    d.set_password("alice", "new")
    assert d.verify_password("alice", "old") is None
    assert d.verify_password("alice", "new") is not None


def test_unknown_logins(d: SqlDirectory) -> None:
    with pytest.raises(DirectoryError, match=r"^unknown login 'bob'$"):
        d.set_password("bob", "pw")
    with pytest.raises(DirectoryError, match=r"^unknown login 'bob'$"):
        d.set_enabled("bob", True)
    with pytest.raises(DirectoryError, match=r"^unknown login 'bob'$"):
        d.set_suspended("bob", True)
    with pytest.raises(DirectoryError, match=r"^unknown login 'bob'$"):
        d.remove_user("bob")


def test_an_old_hash_is_upgraded_at_login(backend: Backend, d: SqlDirectory) -> None:
    d.add_user("alice", "alice@example.org", "pw")
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash("pw")
    backend.sql("UPDATE users SET password_hash = ?", (weak,))
    assert d.verify_password("alice", "pw") is not None
    ((stored,),) = backend.sql("SELECT password_hash FROM users")
    assert isinstance(stored, str)
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert d.verify_password("alice", "pw") is not None


def test_remove_user_removes_their_grants(d: SqlDirectory) -> None:
    d.add_user("alice", "alice@example.org", "pw")
    d.add_user("bob", "bob@example.org", "pw")
    d.grant("info@example.org", "alice")
    d.grant("info@example.org", "bob")
    d.remove_user("alice")
    assert d.get_user("alice") is None
    assert d.list_grants() == [("info@example.org", "bob")]


# --- generation --------------------------------------------------------------------


def test_generation_changes_with_every_change_and_is_shared(
    backend: Backend, d: SqlDirectory
) -> None:
    other = backend.open()  # as another process would see it
    try:
        seen = [d.generation()]

        def changed() -> None:
            now = other.generation()
            assert now != seen[-1]
            seen.append(now)

        d.add_user("alice", "alice@example.org", "pw")
        changed()
        d.set_password("alice", "pw2")
        changed()
        d.set_enabled("alice", False)
        changed()
        d.set_suspended("alice", True)
        changed()
        d.add_domain("dept.example.org")
        changed()
        d.grant("*@dept.example.org", "alice")
        changed()
        d.revoke("*@dept.example.org")
        changed()
        d.remove_user("alice")
        changed()
        # Reads and failed logins change nothing.
        d.list_users()
        d.verify_password("alice", "pw2")
        assert other.generation() == seen[-1]
    finally:
        other.close()


# --- domains and keys --------------------------------------------------------------


def test_domains_add_get_list_remove(d: SqlDirectory) -> None:
    assert d.add_domain("Dept.Example.ORG") == Domain("dept.example.org")
    d.add_domain("college.example.org")
    with pytest.raises(DirectoryError, match=r"^domain dept\.example\.org already exists$"):
        d.add_domain("dept.example.org")
    with pytest.raises(DirectoryError, match=r"is not a valid domain name"):
        d.add_domain("not a domain")
    assert d.get_domain("DEPT.example.org") == Domain("dept.example.org")
    assert d.get_domain("other.example.org") is None
    assert d.get_domain("not a domain") is None
    assert [x.name for x in d.list_domains()] == ["college.example.org", "dept.example.org"]
    d.remove_domain("college.example.org")
    assert [x.name for x in d.list_domains()] == ["dept.example.org"]
    with pytest.raises(DirectoryError, match=r"^unknown domain college\.example\.org$"):
        d.remove_domain("college.example.org")


def test_dkim_keys(tmp_path: Path, d: SqlDirectory) -> None:
    d.add_domain("dept.example.org")
    d.add_dkim_key("dept.example.org", key())
    absolute = DkimKey("mg20261201-ed", "ed25519-sha256", Path("/etc/keys/ed.key"), "11qYAYK")
    d.add_dkim_key("dept.example.org", absolute)
    got = d.get_domain("dept.example.org")
    assert got is not None
    assert got.keys == (
        DkimKey("mg20261128", "rsa-sha256",
                tmp_path / "dkim/dept.example.org/mg20261128.key", "MIIBIjANBgkq"),
        absolute,
    )  # fmt: skip
    assert d.list_domains() == [got]
    d.set_dkim_key_active("dept.example.org", "mg20261128", False)
    domain = d.get_domain("dept.example.org")
    assert domain is not None
    assert [k.active for k in domain.keys] == [False, True]
    d.remove_dkim_key("dept.example.org", "mg20261201-ed")
    domain = d.get_domain("dept.example.org")
    assert domain is not None
    assert [k.selector for k in domain.keys] == ["mg20261128"]
    assert Path("/etc/keys/ed.key").exists() is False  # nothing was created or touched


def test_dkim_key_errors(d: SqlDirectory) -> None:
    with pytest.raises(DirectoryError, match=r"^unknown domain dept\.example\.org$"):
        d.add_dkim_key("dept.example.org", key())
    d.add_domain("dept.example.org")
    d.add_dkim_key("dept.example.org", key())
    with pytest.raises(DirectoryError, match=r"already has a DKIM key 'mg20261128'$"):
        d.add_dkim_key("dept.example.org", key())
    with pytest.raises(DirectoryError, match=r"^unknown DKIM algorithm 'rsa-sha1'$"):
        d.add_dkim_key("dept.example.org", DkimKey("s2", "rsa-sha1", Path("k"), "x"))
    with pytest.raises(DirectoryError, match=r"^invalid DKIM selector 'a b'$"):
        d.add_dkim_key("dept.example.org", DkimKey("a b", "rsa-sha256", Path("k"), "x"))
    with pytest.raises(DirectoryError, match=r"has no DKIM key 'nope'$"):
        d.set_dkim_key_active("dept.example.org", "nope", True)
    with pytest.raises(DirectoryError, match=r"has no DKIM key 'nope'$"):
        d.remove_dkim_key("dept.example.org", "nope")


def test_smarthost_networks(d: SqlDirectory) -> None:
    d.add_domain("dept.example.org")
    d.set_smarthost_networks("dept.example.org", ("10.1.2.3/16", "2001:db8::/32"))
    domain = d.get_domain("dept.example.org")
    assert domain is not None
    assert domain.smarthost_networks == ("10.1.0.0/16", "2001:db8::/32")
    with pytest.raises(DirectoryError, match=r"^'10\.0\.0\.0/33' is not an IP network$"):
        d.set_smarthost_networks("dept.example.org", ("10.0.0.0/33",))
    with pytest.raises(DirectoryError, match=r"^unknown domain other\.example\.org$"):
        d.set_smarthost_networks("other.example.org", ())


def test_remove_domain_removes_its_grants_and_key_rows(backend: Backend, d: SqlDirectory) -> None:
    d.add_user("alice", "alice@example.org", "pw")
    for name in ("dept.example.org", "sub.dept.example.org"):
        d.add_domain(name)
        d.grant(f"*@{name}", "alice")
        d.grant(f"bursar@{name}", "alice")
    d.add_dkim_key("dept.example.org", key())
    d.add_dkim_key("dept.example.org", key("old", "dkim/dept.example.org-old.key"))

    d.remove_domain("dept.example.org")

    assert d.get_domain("dept.example.org") is None
    assert not d.is_managed("dept.example.org")
    assert d.list_grants() == [("*@sub.dept.example.org", "alice"),
                               ("bursar@sub.dept.example.org", "alice")]  # fmt: skip
    assert not d.may_send_as("alice", "bursar@dept.example.org")
    assert backend.sql("SELECT count(*) FROM dkim_keys") == [(0,)]
    with pytest.raises(DirectoryError, match=r"^unknown domain dept\.example\.org$"):
        d.remove_domain("dept.example.org")


# --- grants and policy questions ---------------------------------------------------------


def test_is_managed(d: SqlDirectory) -> None:
    d.add_domain("dept.example.org")
    assert d.is_managed("example.org")
    assert d.is_managed("EXAMPLE.ORG")
    assert d.is_managed("dept.example.org")
    assert not d.is_managed("sub.dept.example.org")
    assert not d.is_managed("gmail.com")
    assert not d.is_managed("")
    assert not d.is_managed("not a domain")


def test_may_send_as(d: SqlDirectory) -> None:
    d.add_user("alice", "Alice@example.org", "pw")
    d.add_user("bob", "bob@example.org", "pw")
    d.add_domain("dept.example.org")
    d.add_domain("college.example.org")
    d.grant("bursar@college.example.org", "alice")
    d.grant("*@dept.example.org", "bob")
    assert d.may_send_as("alice", "alice@example.org")  # primary, any case
    assert d.may_send_as("ALICE", "ALICE@EXAMPLE.ORG")
    assert d.may_send_as("alice", "Bursar@College.example.org")  # exact grant
    assert not d.may_send_as("alice", "porter@college.example.org")
    assert not d.may_send_as("alice", "bob@example.org")
    assert d.may_send_as("bob", "anyone@dept.example.org")  # domain-wide grant
    assert d.may_send_as("bob", "Head.Of.Dept@DEPT.example.org")
    assert not d.may_send_as("bob", "x@sub.dept.example.org")  # not a subdomain
    assert not d.may_send_as("bob", "bursar@college.example.org")
    assert not d.may_send_as("nobody", "nobody@example.org")
    assert not d.may_send_as("alice", "")
    assert not d.may_send_as("alice", "<>")
    assert not d.may_send_as("alice", "*@college.example.org")


def test_grant_errors(d: SqlDirectory) -> None:
    d.add_user("alice", "alice@example.org", "pw")
    with pytest.raises(DirectoryError, match=r"^gmail\.com is not a managed domain \(add it "
                       r"with: mailgate domain add gmail\.com\)$"):  # fmt: skip
        d.grant("someone@gmail.com", "alice")
    with pytest.raises(DirectoryError, match=r"^unknown login 'bob'$"):
        d.grant("info@example.org", "bob")
    with pytest.raises(DirectoryError, match=r"^invalid address 'info'"):
        d.grant("info", "alice")
    assert d.list_grants() == []


def test_grant_twice_and_to_several_users(d: SqlDirectory) -> None:
    d.add_user("alice", "alice@example.org", "pw")
    d.add_user("bob", "bob@example.org", "pw")
    d.grant("info@example.org", "alice")
    d.grant("Info@Example.org", "ALICE")  # the same grant: harmless
    d.grant("info@example.org", "bob")
    assert d.list_grants() == [("info@example.org", "alice"), ("info@example.org", "bob")]
    assert d.list_grants("bob") == [("info@example.org", "bob")]
    assert d.list_grants("nobody") == []


def test_revoke(d: SqlDirectory) -> None:
    d.add_user("alice", "alice@example.org", "pw")
    d.add_user("bob", "bob@example.org", "pw")
    for login in ("alice", "bob"):
        d.grant("info@example.org", login)
        d.grant("*@example.org", login)
    d.revoke("info@example.org", "alice")
    assert d.may_send_as("alice", "info@example.org")  # still, through *@example.org
    assert d.list_grants("alice") == [("*@example.org", "alice")]
    d.revoke("*@example.org")
    assert d.list_grants() == [("info@example.org", "bob")]
    assert not d.may_send_as("alice", "info@example.org")
    with pytest.raises(DirectoryError, match=r"^info@example\.org is not granted to 'alice'$"):
        d.revoke("info@example.org", "alice")
    with pytest.raises(DirectoryError, match=r"^\*@example\.org is not granted to anyone$"):
        d.revoke("*@example.org")


# --- threads ----------------------------------------------------------------------------


def test_verify_from_many_threads_while_another_writes(d: SqlDirectory) -> None:
    # The server calls verify_password via asyncio.to_thread from several worker threads.
    for i in range(4):
        d.add_user(f"user{i}", f"user{i}@example.org", f"pw{i}")
    errors: list[BaseException] = []
    results: list[bool] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        try:
            for _ in range(3):
                ok = d.verify_password(f"user{i % 4}", f"pw{i % 4}") is not None
                refused = d.verify_password(f"user{i % 4}", "wrong") is None
                with lock:
                    results.append(ok and refused)
        except BaseException as e:  # collected and re-raised below
            with lock:
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for n in range(5):  # writes from this thread meanwhile
        d.add_user(f"extra{n}", f"extra{n}@example.org", "pw")
        d.set_enabled(f"extra{n}", False)
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    assert errors == []
    assert results == [True] * 24
    assert len(d.list_users()) == 9


def test_close_then_use_again(tmp_path: Path, sqlite_d: SqliteDirectory) -> None:
    sqlite_d.add_user("alice", "alice@example.org", "pw")
    sqlite_d.close()
    assert sqlite_d.get_user("alice") is not None  # reconnects on demand
    assert os.path.exists(tmp_path / "state.db")


# --- app passwords (migration 0002) -------------------------------------------------------------
def test_app_passwords(d: SqlDirectory) -> None:
    from mailgate.directory import passwords

    d.add_user("alice", "alice@example.org", "pw")
    secret = passwords.new_app_password()
    assert passwords.is_app_password_shaped(secret) and not passwords.is_app_password_shaped("pw")
    before = d.generation()
    app = d.add_app_password("Alice", "phone", passwords.app_password_hash(secret))
    assert d.generation() != before  # the server's credential cache empties
    assert (app.login, app.name, app.last_used_at) == ("alice", "phone", None)
    assert d.use_app_password("alice", passwords.app_password_hash("wrong-" + secret)) is None
    before = d.generation()
    # Case and surrounding blanks do not matter (people type them from a screen).
    assert (
        d.use_app_password("alice", passwords.app_password_hash(f" {secret.upper()} ")) == "phone"
    )
    assert d.generation() == before  # recording a use changes nothing anyone caches
    [listed] = d.list_app_passwords("alice")
    assert listed.last_used_at is not None and listed.created_at == app.created_at
    with pytest.raises(DirectoryError, match="already has an app password 'phone'"):
        d.add_app_password("alice", "phone", passwords.app_password_hash(secret + "x"))
    with pytest.raises(DirectoryError, match="unknown login 'bob'"):
        d.add_app_password("bob", "phone", "0" * 64)
    before = d.generation()
    d.remove_app_password("alice", "phone")
    assert d.generation() != before
    assert d.use_app_password("alice", passwords.app_password_hash(secret)) is None
    with pytest.raises(DirectoryError, match="'alice' has no app password 'phone'"):
        d.remove_app_password("alice", "phone")
    d.add_app_password("alice", "laptop", passwords.app_password_hash(secret))
    d.remove_user("alice")  # its app passwords go with it
    assert d.list_app_passwords() == []


def test_a_version_1_database_gains_app_passwords(backend: Backend, d: SqlDirectory) -> None:
    d.add_user("old", "old@example.org", "pw")
    d.close()
    # Back to version 1, as a database made before migration 0002 is.
    backend.sql("DROP TABLE app_passwords")
    backend.sql("DELETE FROM schema_version WHERE version > 1")
    with (
        backend.open()
        if backend.is_sqlite
        else open_url(
            backend.url, default_domain=DEFAULT, data_dir=backend.data_dir, check=False
        ) as again
    ):
        if not backend.is_sqlite:
            assert again.migrate() == ["0002_app_passwords.sql"]
        again.add_app_password("old", "phone", "0" * 64)
        assert [a.name for a in again.list_app_passwords("old")] == ["phone"]

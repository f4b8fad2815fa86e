"""`mailgate user ...`, `address ...` and `directory ...` through cli.main, on each backend: a
real SQLite file and a fresh PostgreSQL database (made ready with `mailgate directory migrate`)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailgate import cli
from mailgate.directory import User, migrate, open_url, passwords
from mailgate.directory.sql import SqlDirectory
from tests.support.databases import postgres_database

CONFIG = """\
hostname = "mail.example.org"
[directory]
default_domain = "example.org"
"""


@dataclass
class Result:
    status: int
    out: str
    err: str


class Mailgate:
    """Runs `mailgate -c <tmp>/mailgate.toml ...` in-process with the given standard input."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch,
                 capsys: pytest.CaptureFixture[str], url: str) -> None:  # fmt: skip
        self.root = root
        self.url = url
        self.config = root / "mailgate.toml"
        self.config.write_text(CONFIG + f'url = "{url}"\n')
        self._monkeypatch = monkeypatch
        self._capsys = capsys

    def __call__(self, *args: str, stdin: str = "") -> Result:
        self._monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        status = cli.main(["-c", str(self.config), *args])
        out, err = self._capsys.readouterr()
        return Result(status, out, err)

    def directory(self) -> SqlDirectory:
        return open_url(self.url, default_domain="example.org", data_dir=self.root)


@pytest.fixture(params=["sqlite", "postgresql"])
def mg(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
       capsys: pytest.CaptureFixture[str]) -> Iterator[Mailgate]:  # fmt: skip
    if request.param == "sqlite":
        yield Mailgate(tmp_path, monkeypatch, capsys, f"sqlite:///{tmp_path / 'state.db'}")
        return
    with postgres_database() as url:
        mg = Mailgate(tmp_path, monkeypatch, capsys, url)
        r = mg("directory", "migrate")
        assert (r.status, r.err) == (0, "")
        assert r.out.startswith("migrated postgresql://postgres@127.0.0.1:5432/mailgate_test_")
        steps = [m.name for m in migrate.migrations("postgresql")]
        assert r.out.endswith(f" to schema version {len(steps)} ({', '.join(steps)})\n")
        yield mg


def ok(r: Result, out: str) -> None:
    assert (r.status, r.out, r.err) == (0, out, "")


def fails(r: Result, err: str) -> None:
    assert (r.status, r.out, r.err) == (1, "", err)


# --- user ------------------------------------------------------------------------


def test_user_add_reads_one_line_without_its_line_ending(mg: Mailgate) -> None:
    ok(mg("user", "add", "alice", "--password-stdin", stdin="correct horse\r\nignored\n"),
       "added user alice <alice@example.org>\n")  # fmt: skip
    ok(mg("user", "add", "bob", "--password-stdin", stdin="no newline at all"),
       "added user bob <bob@example.org>\n")  # fmt: skip
    with mg.directory() as d:
        assert d.verify_password("alice", "correct horse") == User("alice", "alice@example.org")
        assert d.verify_password("alice", "correct horse\r") is None
        assert d.verify_password("bob", "no newline at all") is not None


def test_user_add_with_an_address(mg: Mailgate) -> None:
    ok(mg("user", "add", "asmith", "--address", "Alice.Smith@Example.org", "--password-stdin",
          stdin="pw\n"), "added user asmith <Alice.Smith@example.org>\n")  # fmt: skip
    # A login that is an address is its own primary address.
    ok(mg("user", "add", "carol@college.example.org", "--password-stdin", stdin="pw\n"),
       "added user carol@college.example.org <carol@college.example.org>\n")  # fmt: skip


def test_user_add_errors(mg: Mailgate) -> None:
    fails(mg("user", "add", "alice", "--password-stdin", stdin=""),
          "mailgate: empty password on standard input\n")  # fmt: skip
    fails(mg("user", "add", "alice", "--password-stdin", stdin="\n"),
          "mailgate: empty password on standard input\n")  # fmt: skip
    fails(mg("user", "add", "alice", "--address", "alice", "--password-stdin", stdin="pw\n"),
          "mailgate: invalid address 'alice': expected local@domain\n")  # fmt: skip
    fails(mg("user", "add", "al ice", "--password-stdin", stdin="pw\n"),
          "mailgate: invalid login 'al ice': expected 1-255 printable characters, "
          "no spaces\n")  # fmt: skip
    ok(mg("user", "add", "alice", "--password-stdin", stdin="pw\n"),
       "added user alice <alice@example.org>\n")  # fmt: skip
    fails(mg("user", "add", "ALICE", "--password-stdin", stdin="pw\n"),
          "mailgate: login 'ALICE' already exists\n")  # fmt: skip


def test_password_only_from_stdin(mg: Mailgate) -> None:
    with pytest.raises(SystemExit) as e:  # argparse: the option is required
        mg("user", "add", "alice")
    assert e.value.code == 2


def test_user_passwd(mg: Mailgate) -> None:
    mg("user", "add", "alice", "--password-stdin", stdin="old\n")
    ok(mg("user", "passwd", "alice", "--password-stdin", stdin="new\n"),
       "password changed for alice\n")  # fmt: skip
    with mg.directory() as d:
        assert d.verify_password("alice", "old") is None
        assert d.verify_password("alice", "new") is not None
    fails(mg("user", "passwd", "bob", "--password-stdin", stdin="new\n"),
          "mailgate: unknown login 'bob'\n")  # fmt: skip


def test_disable_enable_and_suspension(mg: Mailgate) -> None:
    mg("user", "add", "alice", "--password-stdin", stdin="pw\n")
    ok(mg("user", "disable", "alice"), "disabled alice\n")
    with mg.directory() as d:
        assert d.verify_password("alice", "pw") is None
        d.set_suspended("alice", True)  # as the breaker would
    ok(mg("user", "enable", "alice"), "enabled alice\n")
    with mg.directory() as d:
        assert d.get_user("alice") == User("alice", "alice@example.org", True, False)
        assert d.verify_password("alice", "pw") is not None
    fails(mg("user", "disable", "bob"), "mailgate: unknown login 'bob'\n")
    fails(mg("user", "enable", "bob"), "mailgate: unknown login 'bob'\n")


def test_user_remove(mg: Mailgate) -> None:
    mg("user", "add", "alice", "--password-stdin", stdin="pw\n")
    ok(mg("user", "remove", "alice"), "removed alice\n")
    fails(mg("user", "remove", "alice"), "mailgate: unknown login 'alice'\n")


def test_user_list(mg: Mailgate) -> None:
    ok(mg("user", "list"), "no users\n")
    ok(mg("user", "list", "--json"), "[]\n")
    mg("user", "add", "bob", "--password-stdin", stdin="pw\n")
    mg("user", "add", "alice", "--address", "a@example.org", "--password-stdin", stdin="pw\n")
    mg("user", "disable", "bob")
    with mg.directory() as d:
        d.set_suspended("bob", True)
    ok(mg("user", "list"),
       "LOGIN  STATE               ADDRESS\n"
       "alice  enabled             a@example.org\n"
       "bob    disabled+suspended  bob@example.org\n")  # fmt: skip
    r = mg("user", "list", "--json")
    assert (r.status, r.err) == (0, "")
    assert json.loads(r.out) == [
        {"login": "alice", "address": "a@example.org", "enabled": True, "suspended": False},
        {"login": "bob", "address": "bob@example.org", "enabled": False, "suspended": True},
    ]


def test_a_missing_configuration(mg: Mailgate) -> None:
    mg.config.unlink()
    fails(
        mg("user", "list"),
        f"mailgate: {mg.config}: configuration file not found (name it with -c or "
        "$MAILGATE_CONFIG, or create one with `mailgate init`)\n",
    )


# --- address -----------------------------------------------------------------------


def test_address_add_list_remove(mg: Mailgate) -> None:
    mg("user", "add", "alice", "--password-stdin", stdin="pw\n")
    mg("user", "add", "bob", "--password-stdin", stdin="pw\n")
    with mg.directory() as d:
        d.add_domain("dept.example.org")
    ok(mg("address", "list"), "no granted addresses\n")
    ok(mg("address", "add", "info@example.org", "--owner", "alice"),
       "granted info@example.org to alice\n")  # fmt: skip
    ok(mg("address", "add", "info@example.org", "--owner", "bob"),
       "granted info@example.org to bob\n")  # fmt: skip
    ok(mg("address", "add", "*@Dept.Example.org", "--owner", "bob"),
       "granted *@Dept.Example.org to bob\n")  # fmt: skip
    ok(mg("address", "list"),
       "ADDRESS             OWNER\n"
       "*@dept.example.org  bob\n"
       "info@example.org    alice\n"
       "info@example.org    bob\n")  # fmt: skip
    r = mg("address", "list", "--owner", "bob", "--json")
    assert (r.status, r.err) == (0, "")
    assert json.loads(r.out) == [
        {"address": "*@dept.example.org", "owner": "bob"},
        {"address": "info@example.org", "owner": "bob"},
    ]
    with mg.directory() as d:
        assert d.may_send_as("bob", "head@dept.example.org")
        assert d.may_send_as("alice", "info@example.org")
    ok(mg("address", "remove", "info@example.org", "--owner", "alice"),
       "removed info@example.org from alice\n")  # fmt: skip
    ok(mg("address", "remove", "*@dept.example.org"), "removed *@dept.example.org\n")
    ok(mg("address", "list", "--json"), '[\n  {\n    "address": "info@example.org",\n'
                                        '    "owner": "bob"\n  }\n]\n')  # fmt: skip


def test_address_errors(mg: Mailgate) -> None:
    mg("user", "add", "alice", "--password-stdin", stdin="pw\n")
    fails(mg("address", "add", "someone@gmail.com", "--owner", "alice"),
          "mailgate: gmail.com is not a managed domain (add it with: mailgate domain add "
          "gmail.com)\n")  # fmt: skip
    fails(mg("address", "add", "info@example.org", "--owner", "bob"),
          "mailgate: unknown login 'bob'\n")  # fmt: skip
    fails(mg("address", "add", "not-an-address", "--owner", "alice"),
          "mailgate: invalid address 'not-an-address': expected local@domain\n")  # fmt: skip
    fails(mg("address", "remove", "info@example.org"),
          "mailgate: info@example.org is not granted to anyone\n")  # fmt: skip
    fails(mg("address", "list", "--owner", "bob"), "mailgate: unknown login 'bob'\n")
    with pytest.raises(SystemExit) as e:  # --owner is required to add
        mg("address", "add", "info@example.org")
    assert e.value.code == 2


def test_directory_migrate_again_changes_nothing(mg: Mailgate) -> None:
    r = mg("directory", "migrate")
    assert (r.status, r.err) == (0, "")
    latest = migrate.latest("postgresql")
    assert r.out.endswith(f" is at schema version {latest} (latest: {latest}): nothing to do\n")
    assert r.out.startswith((str(mg.root / "state.db"), mg.url))


def test_domain_commands(mg: Mailgate) -> None:
    mg("user", "add", "alice", "--password-stdin", stdin="pw\n")
    r = mg("domain", "add", "dept.example.org", "--allow-network", "10.1.0.0/16")
    assert (r.status, r.err) == (0, "")
    assert r.out.startswith("; added domain dept.example.org with DKIM key(s) ")
    ok(mg("domain", "allow-network", "dept.example.org", "10.2.0.0/16"),
       "dept.example.org: smart-host mail from 10.2.0.0/16 is signed\n")  # fmt: skip
    r = mg("domain", "list", "--json")
    assert r.status == 0
    (listed,) = json.loads(r.out)
    assert listed["name"] == "dept.example.org"
    assert listed["smarthost_networks"] == ["10.1.0.0/16", "10.2.0.0/16"]
    ok(mg("address", "add", "*@dept.example.org", "--owner", "alice"),
       "granted *@dept.example.org to alice\n")  # fmt: skip
    r = mg("domain", "remove", "dept.example.org")
    assert r.out.startswith("removed domain dept.example.org and 1 grant(s)")
    ok(
        mg("domain", "list"),
        "no domains with DKIM keys; example.org (directory.default_domain) "
        "is managed for senders: `mailgate domain add example.org` gives it a key\n",
    )


def test_copy_a_sqlite_directory_to_postgresql(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    mg = Mailgate(tmp_path, monkeypatch, capsys, f"sqlite:///{tmp_path / 'state.db'}")
    mg("user", "add", "alice", "--password-stdin", stdin="alice's secret\n")
    mg("user", "add", "bob", "--password-stdin", stdin="bob's secret\n")
    mg("user", "disable", "bob")
    mg("domain", "add", "dept.example.org", "--ed25519")
    mg("address", "add", "*@dept.example.org", "--owner", "alice")
    app = mg("app-password", "add", "alice", "phone").out.strip()
    with postgres_database() as url:
        r = mg("directory", "copy", "--to", url)
        assert (r.status, r.err) == (0, "")
        assert r.out == (f"copied {mg.root / 'state.db'} to {url}: 2 users, 1 domains, "
                         "2 dkim_keys, 1 grants, 1 app_passwords\n")  # fmt: skip
        with open_url(url, default_domain="example.org", data_dir=mg.root) as pg, \
                mg.directory() as lite:  # fmt: skip
            assert pg.list_users() == lite.list_users()
            assert pg.list_domains() == lite.list_domains()
            assert pg.list_grants() == [("*@dept.example.org", "alice")]
            # The hashes came along: nobody's password changed.
            assert pg.verify_password("alice", "alice's secret") is not None
            assert pg.verify_password("bob", "bob's secret") is None  # still disabled
            assert pg.use_app_password("alice", passwords.app_password_hash(app)) == "phone"
        fails(mg("directory", "copy", "--to", url),
              f"mailgate: {url}: table users already has 2 rows; copy only into an empty "
              "directory\n")  # fmt: skip

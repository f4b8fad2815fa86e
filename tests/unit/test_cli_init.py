"""`mailgate init` (and `check-config` on its result) through cli.main, in tmp_path."""

from __future__ import annotations

import datetime as dt
import grp
import ipaddress
import os
import pwd
import re
import stat
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    PrivateFormat,
    load_pem_private_key,
)

from mailgate import cli, config, tlscert
from mailgate.cli import init
from mailgate.config import Config, Listen
from mailgate.directory.store import SqliteDirectory
from mailgate.errors import ConfigError

Run = Callable[..., tuple[int, str, str]]

# INTERFACE.md "Configuration (TOML)": every key, in every new mailgate.toml.
INTERFACE_KEYS = {
    "hostname": None,
    "directory": {"url", "default_domain"},
    "spool": {"path"},
    "tls": {"cert", "key"},
    "submission": {"listen"},
    "submissions": {"listen"},
    "smarthost": {"listen", "networks"},
    "delivery": {"nameservers", "smtp_port", "relay"},
    "scanner": {"clamd", "blocked_extensions"},
    "limits": {"max_message_size"},
}


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    def run(*args: str) -> tuple[int, str, str]:
        status = cli.main(list(args))
        out, err = capsys.readouterr()
        return status, out, err

    return run


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_for_tests_on_loopback(tmp_path: Path, run: Run) -> None:
    root = tmp_path / "gw"  # created by init
    status, out, err = run("init", str(root), "--hostname", "mail.example.org",
                           "--default-domain", "example.ac.uk", "--listen-host", "127.0.0.1",
                           "--port-base", "10000")  # fmt: skip
    assert (status, err) == (0, "")
    assert out.splitlines()[:4] == [
        f"created {root}/mailgate.toml",
        f"created {root}/spool/",
        f"created {root}/state.db",
        f"created {root}/tls/cert.pem and {root}/tls/key.pem (self-signed for "
        "mail.example.org, valid 10 years)",
    ]
    assert "next steps:" in out
    assert f"mailgate -c {root}/mailgate.toml user add alice --password-stdin" in out

    cfg = config.load(root / "mailgate.toml", check_files=True)
    assert cfg.hostname == "mail.example.org"
    assert cfg.directory.default_domain == "example.ac.uk"
    assert cfg.directory.sqlite_path == root / "state.db"
    assert cfg.spool.path == root / "spool"
    assert cfg.submission.listen == (Listen("127.0.0.1", 10587),)
    assert cfg.submissions.listen == (Listen("127.0.0.1", 10465),)
    assert cfg.smarthost.listen == (Listen("127.0.0.1", 10025),)
    assert [str(n) for n in cfg.smarthost.networks] == ["127.0.0.0/8", "::1/128"]
    assert cfg.scanner.clamd == ""

    assert mode(root / "tls" / "key.pem") == 0o600
    assert mode(root / "tls") == 0o700
    assert mode(root / "spool") == 0o700
    assert mode(root / "state.db") == 0o600

    assert run("-c", str(root / "mailgate.toml"), "check-config") == (
        0, f"ok: {root}/mailgate.toml\n", ""
    )  # fmt: skip
    with SqliteDirectory(cfg.directory.sqlite_path, default_domain="example.ac.uk",
                         data_dir=root) as directory:  # fmt: skip
        assert directory.list_users() == []
        assert directory.is_managed("example.ac.uk")


def test_the_certificate(tmp_path: Path, run: Run) -> None:
    run("init", str(tmp_path), "--hostname", "mail.example.org")
    cert = x509.load_pem_x509_certificate((tmp_path / "tls/cert.pem").read_bytes())
    key = load_pem_private_key((tmp_path / "tls/key.pem").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert cert.public_key() == key.public_key()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"),
    ]  # fmt: skip
    assert cert.issuer == cert.subject
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3650) <= lifetime <= dt.timedelta(days=3651)
    assert cert.not_valid_before_utc <= dt.datetime.now(dt.UTC)
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca is False
    tlscert.check_pair(tmp_path / "tls/cert.pem", tmp_path / "tls/key.pem")


def test_init_twice_destroys_nothing(tmp_path: Path, run: Run) -> None:
    assert run("init", str(tmp_path), "--hostname", "mail.example.org")[0] == 0
    toml = tmp_path / "mailgate.toml"
    changed = toml.read_text().replace('default_domain = "example.org"',
                                       'default_domain = "example.net"')  # fmt: skip
    toml.write_text(changed + "# a note of the operator's\n")
    before = {p: p.read_bytes() for p in (toml, tmp_path / "tls/cert.pem",
                                          tmp_path / "tls/key.pem")}  # fmt: skip
    with SqliteDirectory(tmp_path / "state.db", default_domain="example.net",
                         data_dir=tmp_path) as directory:  # fmt: skip
        directory.add_user("alice", "alice@example.net", "pw")
    (tmp_path / "spool" / "msg").mkdir()

    status, out, err = run("init", str(tmp_path), "--hostname", "other.example.org")

    assert (status, err) == (0, "")
    assert out.splitlines()[:4] == [
        f"kept {toml} (already exists; ignored --hostname)",
        f"kept {tmp_path}/spool/ (already exists)",
        f"kept {tmp_path}/state.db (already exists)",
        f"kept {tmp_path}/tls/cert.pem and {tmp_path}/tls/key.pem (already exist)",
    ]
    assert {p: p.read_bytes() for p in before} == before
    assert (tmp_path / "spool" / "msg").is_dir()
    with SqliteDirectory(tmp_path / "state.db", default_domain="example.net",
                         data_dir=tmp_path) as directory:  # fmt: skip
        assert directory.verify_password("alice", "pw") is not None


def test_init_again_creates_only_what_is_missing(tmp_path: Path, run: Run) -> None:
    run("init", str(tmp_path), "--hostname", "mail.example.org")
    # The operator moved the spool elsewhere in the configuration, and removed the TLS pair.
    toml = tmp_path / "mailgate.toml"
    toml.write_text(toml.read_text().replace('path = "spool"', 'path = "var/spool"'))
    (tmp_path / "tls/cert.pem").unlink()
    (tmp_path / "tls/key.pem").unlink()
    status, out, err = run("init", str(tmp_path))
    assert (status, err) == (0, "")
    assert out.splitlines()[:4] == [
        f"kept {toml} (already exists)",
        f"created {tmp_path}/var/spool/",
        f"kept {tmp_path}/state.db (already exists)",
        f"created {tmp_path}/tls/cert.pem and {tmp_path}/tls/key.pem (self-signed for "
        "mail.example.org, valid 10 years)",
    ]
    assert mode(tmp_path / "var/spool") == 0o700
    assert run("-c", str(toml), "check-config")[0] == 0


def test_half_a_tls_pair_is_not_replaced(tmp_path: Path, run: Run) -> None:
    run("init", str(tmp_path))
    (tmp_path / "tls/cert.pem").unlink()
    key = (tmp_path / "tls/key.pem").read_bytes()
    status, _, err = run("init", str(tmp_path))
    assert status == 1
    assert err == (
        f"mailgate: {tmp_path}/tls/cert.pem is missing but {tmp_path}/tls/key.pem exists; "
        f"supply the missing file, or remove {tmp_path}/tls/key.pem and run init again\n"
    )
    assert (tmp_path / "tls/key.pem").read_bytes() == key


def test_defaults(tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.getfqdn", lambda: "Gate.Example.NET")
    monkeypatch.chdir(tmp_path)
    status, out, _ = run("init")  # DIR defaults to .
    assert status == 0
    assert f"created {tmp_path}/mailgate.toml" in out
    assert "mailgate user add alice --password-stdin" in out  # no -c needed in .
    cfg = config.load(tmp_path / "mailgate.toml")
    assert cfg.hostname == "gate.example.net"
    assert cfg.directory.default_domain == "example.org"
    assert [str(x) for x in cfg.submission.listen] == ["0.0.0.0:587", "[::]:587"]
    assert [str(x) for x in cfg.submissions.listen] == ["0.0.0.0:465", "[::]:465"]
    assert [str(x) for x in cfg.smarthost.listen] == ["0.0.0.0:25", "[::]:25"]


@pytest.mark.parametrize("fqdn", ["myhost", "bad_name.example.org", ""])
def test_hostname_without_a_usable_fqdn(
    tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch, fqdn: str
) -> None:
    monkeypatch.setattr("socket.getfqdn", lambda: fqdn)
    assert run("init", str(tmp_path))[0] == 0
    assert config.load(tmp_path / "mailgate.toml").hostname == "localhost"


def test_config_path_from_c(tmp_path: Path, run: Run) -> None:
    path = tmp_path / "etc" / "gate.toml"
    assert run("-c", str(path), "init", "--hostname", "mail.example.org")[0] == 0
    assert config.load(path).spool.path == tmp_path / "etc" / "spool"
    assert (tmp_path / "etc" / "tls" / "key.pem").is_file()


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--port-base", "20000"], {"submission": ["0.0.0.0:20587", "[::]:20587"],
                                    "submissions": ["0.0.0.0:20465", "[::]:20465"],
                                    "smarthost": ["0.0.0.0:20025", "[::]:20025"]}),
        (["--listen-host", "::1"], {"submission": ["[::1]:587"], "submissions": ["[::1]:465"],
                                    "smarthost": ["[::1]:25"]}),
        (["--listen-host", "[::1]", "--port-base", "1"],
         {"submission": ["[::1]:588"], "submissions": ["[::1]:466"], "smarthost": ["[::1]:26"]}),
        (["--listen-host", "localhost"], {"submission": ["localhost:587"],
                                          "submissions": ["localhost:465"],
                                          "smarthost": ["localhost:25"]}),
    ],
)  # fmt: skip
def test_listen_options(tmp_path: Path, run: Run, options: list[str],
                        expected: dict[str, list[str]]) -> None:  # fmt: skip
    assert run("init", str(tmp_path), *options)[0] == 0
    cfg = config.load(tmp_path / "mailgate.toml")
    for service, listen in expected.items():
        assert [str(x) for x in getattr(cfg, service).listen] == listen


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (["--port-base", "65000"], "mailgate: --port-base: 65000 puts a port outside 1-65535\n"),
        (["--port-base", "-1"], "mailgate: --port-base: -1 puts a port outside 1-65535\n"),
        (["--listen-host", "mail.example.org"],
         "mailgate: --listen-host: 'mail.example.org' is not an IP address\n"),
        (["--hostname", "bad_host"],
         "mailgate: hostname: 'bad_host' is not a valid domain name\n"),
        (["--default-domain", "not a domain"],
         "mailgate: directory.default_domain: 'not a domain' is not a valid domain name\n"),
    ],
)  # fmt: skip
def test_bad_options_write_nothing(tmp_path: Path, run: Run, options: list[str],
                                   error: str) -> None:  # fmt: skip
    assert run("init", str(tmp_path), *options) == (1, "", error)
    assert list(tmp_path.iterdir()) == []


def test_the_file_has_every_interface_key_and_documents_the_rest(tmp_path: Path,
                                                                 run: Run) -> None:  # fmt: skip
    run("init", str(tmp_path), "--hostname", "mail.example.org")
    text = (tmp_path / "mailgate.toml").read_text()
    raw = tomllib.loads(text)
    assert set(raw) == set(INTERFACE_KEYS)
    for section, keys in INTERFACE_KEYS.items():
        if keys is not None:
            assert set(raw[section]) == keys, section
    # Each explained key follows a comment line.
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\w+ = ", line):
            assert lines[i - 1].startswith("# ") or re.match(r"\w+ = ", lines[i - 1]), line

    # Uncommenting the other settings gives a valid file with the same values as the defaults.
    uncommented = re.sub(r"(?m)^# (\[\w+\]|\w+ = .*)$", r"\1", text)
    full = config.parse(uncommented, tmp_path / "mailgate.toml")
    base = config.parse(text, tmp_path / "mailgate.toml")
    assert full == base
    defaults = Config(path=tmp_path / "mailgate.toml")
    assert full.delivery.retry_schedule == defaults.delivery.retry_schedule
    assert full.ratelimits == defaults.ratelimits
    assert full.limits == defaults.limits
    assert full.scanner == defaults.scanner


# --- the pair check that check-config runs ----------------------------------------------


def test_check_pair_problems(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    tlscert.write_self_signed(cert, key, "mail.example.org")
    with pytest.raises(FileExistsError):  # never overwrites
        tlscert.write_self_signed(cert, key, "mail.example.org")

    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=3651)
    with pytest.raises(ConfigError, match=r"^tls\.cert: .*cert\.pem expired on \d{4}-\d\d-\d\d$"):
        tlscert.check_pair(cert, key, now=later)
    earlier = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    with pytest.raises(ConfigError, match=r"^tls\.cert: .*cert\.pem is not valid before "):
        tlscert.check_pair(cert, key, now=earlier)

    private = load_pem_private_key(key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8,
                              BestAvailableEncryption(b"passphrase"))
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"^tls\.key: .*encrypted\.pem is encrypted; give an "
                       r"unencrypted key$"):  # fmt: skip
        tlscert.check_pair(cert, encrypted)
    with pytest.raises(ConfigError, match=r"^tls\.key: cannot read .*nope\.pem: No such file"):
        tlscert.check_pair(cert, tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match=r"^tls\.key: .*cert\.pem holds no PEM private key$"):
        tlscert.check_pair(cert, cert)

    # A chain: the first certificate is the server's.
    other_cert, _ = tlscert.generate_self_signed("ca.example.org")
    chain = tmp_path / "chain.pem"
    chain.write_bytes(cert.read_bytes() + other_cert)
    tlscert.check_pair(chain, key)


def test_check_config_after_init_finds_a_replaced_key(tmp_path: Path, run: Run) -> None:
    run("init", str(tmp_path), "--listen-host", "127.0.0.1", "--port-base", "10000")
    _, other_key = tlscert.generate_self_signed("mail.example.org")
    (tmp_path / "tls/key.pem").write_bytes(other_key)
    status, out, err = run("-c", str(tmp_path / "mailgate.toml"), "check-config")
    assert (status, out) == (1, "")
    assert err == (f"mailgate: tls.key: {tmp_path}/tls/key.pem does not match the certificate "
                   f"{tmp_path}/tls/cert.pem\n")  # fmt: skip


def test_every_queue_command_right_after_init_sees_an_empty_queue(tmp_path: Path,
                                                                   run: Run) -> None:  # fmt: skip
    """Before the first `serve`, an empty spool is an empty queue, not "no spool (run init)"."""
    root = tmp_path / "gw"
    assert run("init", str(root))[0] == 0
    c = ("-c", str(root / "mailgate.toml"))
    assert run(*c, "queue", "list") == (0, "queue is empty\n", "")
    assert run(*c, "queue", "list", "--json") == (0, "[]\n", "")
    assert run(*c, "queue", "flush") == (0, "flushed 0 entries\n", "")
    for action in ("show", "hold", "release", "delete", "flush"):
        assert run(*c, "queue", action, "0ABC") == (
            1, "", "mailgate: no such queue entry: 0ABC\n"
        ), action  # fmt: skip


@pytest.mark.parametrize("umask", [0o000, 0o002, 0o077])
def test_init_ignores_the_umask(tmp_path: Path, run: Run, umask: int) -> None:
    """Nothing init creates is writable by group or others; the configuration stays readable."""
    root = tmp_path / "a" / "gw"
    old = os.umask(umask)
    try:
        assert run("init", str(root))[0] == 0
    finally:
        os.umask(old)
    assert mode(root) == mode(root.parent) == 0o755
    assert mode(root / "mailgate.toml") == 0o644
    assert mode(root / "tls" / "key.pem") == 0o600
    assert mode(root / "state.db") == 0o600
    created = [root, *root.rglob("*")]
    assert len(created) > 8
    for path in created:
        assert mode(path) & 0o022 == 0, f"{path} {mode(path):o}"
    for path in [root / "spool", *(root / "spool").rglob("*")]:
        assert mode(path) & 0o077 == 0, f"{path} {mode(path):o}"


def _owner(path: Path) -> tuple[str, str, int]:
    st = path.stat()
    return (
        pwd.getpwuid(st.st_uid).pw_name,
        grp.getgrgid(st.st_gid).gr_name,
        stat.S_IMODE(st.st_mode),
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="gives files to another account: needs root")
def test_init_system_layout_owned_by_the_service_account(
    tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc, lib, spool = tmp_path / "etc/mailgate", tmp_path / "var/lib/mailgate", tmp_path / "spool"
    monkeypatch.setattr(init, "SYSTEM_CONFIG_DIR", etc)
    monkeypatch.setattr(init, "SYSTEM_STATE_DIR", lib)
    monkeypatch.setattr(init, "SYSTEM_SPOOL", spool)
    nobody, nogroup = "nobody", grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
    old = os.umask(0)
    try:
        status, out, err = run("init", "--system", "--user", "nobody", "--hostname",
                               "mail.example.ac.uk")  # fmt: skip
    finally:
        os.umask(old)
    assert (status, err) == (0, "")
    assert out.splitlines()[:4] == [
        f"created {etc}/mailgate.toml",
        f"created {spool}/",
        f"created {lib}/state.db",
        f"created {lib}/tls/cert.pem and {lib}/tls/key.pem (self-signed for "
        "mail.example.ac.uk, valid 10 years)",
    ]
    cfg = config.load(etc / "mailgate.toml")
    assert cfg.server.user == "nobody"
    assert cfg.directory.sqlite_path == lib / "state.db"
    assert (cfg.tls.cert, cfg.tls.key) == (lib / "tls/cert.pem", lib / "tls/key.pem")
    assert cfg.spool.path == spool
    # The modes docs/INSTALL.md lists.
    assert _owner(etc) == ("root", "root", 0o755)
    assert _owner(etc / "mailgate.toml") == ("root", nogroup, 0o640)
    assert _owner(etc / "dkim") == (nobody, nogroup, 0o700)
    assert _owner(lib) == (nobody, nogroup, 0o700)
    assert _owner(lib / "state.db") == (nobody, nogroup, 0o600)
    assert _owner(lib / "tls") == (nobody, nogroup, 0o700)
    assert _owner(lib / "tls/key.pem") == (nobody, nogroup, 0o600)
    assert _owner(lib / "tls/cert.pem") == (nobody, nogroup, 0o644)
    for path in [spool, *spool.rglob("*")]:
        assert _owner(path)[:2] == (nobody, nogroup), path
        assert _owner(path)[2] & 0o077 == 0, path


def test_init_system_and_user_need_root_and_a_real_account(tmp_path: Path, run: Run) -> None:
    if os.geteuid() == 0:
        assert run("init", str(tmp_path / "gw"), "--user", "mailgate-test-no-such-user") == (
            1, "", "mailgate: init --user: no user 'mailgate-test-no-such-user' on this machine "
            "(create it: adduser --system --group --home /var/lib/mailgate --no-create-home "
            "mailgate-test-no-such-user)\n",
        )  # fmt: skip
    else:
        assert run("init", str(tmp_path / "gw"), "--user", "nobody") == (
            1, "", "mailgate: init --user: run it as root (it gives files to nobody)\n",
        )  # fmt: skip
    assert not (tmp_path / "gw").exists()
    assert run("init", str(tmp_path / "gw"), "--system")[2] == (
        "mailgate: init --system: takes no DIR or -c; it writes /etc/mailgate\n"
    )

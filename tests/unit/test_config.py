"""config.load: defaults, paths relative to the file, every kind of key converted and checked."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from mailgate import config
from mailgate.config import Config, Listen
from mailgate.errors import ConfigError


def load(tmp_path: Path, text: str, *, check_files: bool = False) -> Config:
    path = tmp_path / "mailgate.toml"
    path.write_text(text, encoding="utf-8")
    return config.load(path, check_files=check_files)


def error(tmp_path: Path, text: str, *, check_files: bool = False) -> str:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text, check_files=check_files)
    return str(e.value)


# --- defaults and paths ---------------------------------------------------------


def test_an_empty_file_gives_the_defaults_with_paths_beside_it(tmp_path: Path) -> None:
    cfg = load(tmp_path, "")
    assert cfg.path == tmp_path / "mailgate.toml"
    assert cfg.base_dir == tmp_path
    assert cfg.hostname == "localhost"
    assert cfg.directory.url == f"sqlite:///{tmp_path}/state.db"
    assert cfg.directory.sqlite_path == tmp_path / "state.db"
    assert cfg.directory.default_domain == "example.org"
    assert cfg.spool.path == tmp_path / "spool"
    assert cfg.tls.cert == tmp_path / "tls/cert.pem"
    assert cfg.tls.key == tmp_path / "tls/key.pem"
    assert cfg.submission.listen == cfg.submissions.listen == cfg.smarthost.listen == ()
    assert cfg.smarthost.networks == ()
    assert cfg.delivery.nameservers == ()
    assert cfg.delivery.smtp_port == 25
    assert cfg.delivery.relay == ""
    assert cfg.delivery.relay_host_port is None
    assert cfg.scanner.clamd == ""
    assert cfg.scanner.blocked_extensions == config.DEFAULT_BLOCKED_EXTENSIONS
    assert "exe" in cfg.scanner.blocked_extensions
    assert cfg.limits.max_message_size == 52428800


def test_relative_paths_are_relative_to_the_file_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "mailgate.toml").write_text(
        '[directory]\nurl = "sqlite:///db/state.db"\n'
        '[spool]\npath = "../var/spool"\n'
        '[tls]\ncert = "certs/c.pem"\n'  # key left at its default: still relative to etc/
        '[scanner]\nclamd = "unix:run/clamd.ctl"\n'
    )
    cfg = config.load(Path("etc/mailgate.toml"), check_files=False)
    assert cfg.path == etc / "mailgate.toml"
    assert cfg.directory.sqlite_path == etc / "db/state.db"
    assert cfg.spool.path == etc / "../var/spool"
    assert cfg.tls.cert == etc / "certs/c.pem"
    assert cfg.tls.key == etc / "tls/key.pem"
    assert cfg.scanner.clamd == f"unix:{etc}/run/clamd.ctl"


def test_absolute_paths_stay(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[directory]\nurl = "sqlite:////var/lib/m/state.db"\n'
                         '[spool]\npath = "/var/spool/m"\n[tls]\nkey = "/etc/k.pem"\n')  # fmt: skip
    assert cfg.directory.sqlite_path == Path("/var/lib/m/state.db")
    assert cfg.spool.path == Path("/var/spool/m")
    assert cfg.tls.key == Path("/etc/k.pem")


def test_default_path_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILGATE_CONFIG", raising=False)
    assert config.default_path() == Path("mailgate.toml")
    monkeypatch.setenv("MAILGATE_CONFIG", "/etc/mailgate/mailgate.toml")
    assert config.default_path() == Path("/etc/mailgate/mailgate.toml")


def test_parse_validates_text_for_a_file_not_yet_written(tmp_path: Path) -> None:
    cfg = config.parse('hostname = "Mail.Example.org."\n', tmp_path / "new" / "mailgate.toml")
    assert cfg.hostname == "mail.example.org"
    assert cfg.spool.path == tmp_path / "new" / "spool"
    assert not (tmp_path / "new").exists()
    with pytest.raises(ConfigError, match=r"^hostname: 'a b' is not a valid domain name$"):
        config.parse('hostname = "a b"', tmp_path / "mailgate.toml")


# --- every kind of key -------------------------------------------------------------


def test_every_kind_converted(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
hostname = "MAIL.Example.AC.UK."
[directory]
default_domain = "Example.AC.UK"
[submission]
listen = ["0.0.0.0:587", "[::]:587", "localhost:1587", "[2001:db8::1]:587"]
[smarthost]
listen = ["127.0.0.1:25"]
networks = ["10.0.0.0/8", "192.168.1.7/24", "2001:db8::/32", "::1/128"]
[delivery]
nameservers = ["127.0.0.1", "::1", "127.0.0.1:5353", "[::1]:5353"]
smtp_port = 2525
relay = "Smtp.Example.org:587"
max_connections = 7
retry_schedule = [60, 120]
postmaster = "postmaster@example.ac.uk"
delay_warning_after = 0
connect_timeout = 5
command_timeout = 2.5
[scanner]
clamd = "tcp:127.0.0.1:3310"
blocked_extensions = [".EXE", "scr.", " bat "]
[limits]
max_message_size = 1000
data_timeout = 60
""",
    )
    assert cfg.hostname == "mail.example.ac.uk"
    assert cfg.directory.default_domain == "example.ac.uk"
    assert cfg.submission.listen == (
        Listen("0.0.0.0", 587), Listen("::", 587), Listen("localhost", 1587),
        Listen("2001:db8::1", 587),
    )  # fmt: skip
    assert [str(x) for x in cfg.submission.listen] == [
        "0.0.0.0:587", "[::]:587", "localhost:1587", "[2001:db8::1]:587",
    ]  # fmt: skip
    assert cfg.smarthost.listen == (Listen("127.0.0.1", 25),)
    assert cfg.smarthost.networks == (
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.168.1.0/24"),
        ipaddress.ip_network("2001:db8::/32"), ipaddress.ip_network("::1/128"),
    )  # fmt: skip
    assert cfg.delivery.nameservers == (
        ("127.0.0.1", 53), ("::1", 53), ("127.0.0.1", 5353), ("::1", 5353),
    )  # fmt: skip
    assert cfg.delivery.smtp_port == 2525
    assert cfg.delivery.relay == "smtp.example.org:587"
    assert cfg.delivery.relay_host_port == ("smtp.example.org", 587)
    assert cfg.delivery.max_connections == 7
    assert cfg.delivery.retry_schedule == (60, 120)
    assert cfg.delivery.postmaster == "postmaster@example.ac.uk"
    assert cfg.delivery.delay_warning_after == 0
    assert cfg.delivery.connect_timeout == 5.0
    assert isinstance(cfg.delivery.connect_timeout, float)
    assert cfg.delivery.command_timeout == 2.5
    assert cfg.scanner.clamd == "tcp:127.0.0.1:3310"
    assert cfg.scanner.blocked_extensions == ("exe", "scr", "bat")
    assert cfg.limits.max_message_size == 1000
    assert cfg.limits.data_timeout == 60.0


def test_ipv6_relay_and_clamd(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[delivery]\nrelay = "[::1]:2525"\n[scanner]\nclamd = "tcp:[::1]:3310"\n')
    assert cfg.delivery.relay == "[::1]:2525"
    assert cfg.delivery.relay_host_port == ("::1", 2525)
    assert cfg.scanner.clamd == "tcp:::1:3310"


def test_ratelimits_section(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[ratelimits]\nlogin_messages_per_hour = 100\nipv4_prefix = 32\n'
                         'shadow = ["ip_messages_per_hour"]\n'
                         '[ratelimits.submission]\nlogin_messages_per_hour = 5\n')  # fmt: skip
    assert cfg.ratelimits.login_messages_per_hour == 100
    assert cfg.ratelimits.ipv4_prefix == 32
    assert cfg.ratelimits.shadow == ("ip_messages_per_hour",)
    assert cfg.ratelimits.submission.login_messages_per_hour == 5
    assert cfg.ratelimits.smarthost.login_messages_per_hour is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour = 1", "colour: unknown key"),
        ("[limits]\nmax_mesage_size = 1", "limits.max_mesage_size: unknown key"),
        ("limits = 5", "limits: expected a table [limits]"),
        ("hostname = 5", "hostname: expected a domain name"),
        ('hostname = "-bad.example"', "hostname: '-bad.example' is not a valid domain name"),
        ('[directory]\nurl = "mysql://x"', "directory.url: expected a URL of the form "
                                           "sqlite:///PATH or postgresql://USER@HOST:PORT/DB"),
        ('[directory]\nurl = "sqlite:///"', "directory.url: the sqlite URL names no file"),
        ('[directory]\ndefault_domain = "exa_mple.org"',
         "directory.default_domain: 'exa_mple.org' is not a valid domain name"),
        ('[spool]\npath = ""', "spool.path: expected a path"),
        ("[tls]\ncert = 3", "tls.cert: expected a path"),
        ('[submission]\nlisten = "0.0.0.0:587"', "submission.listen: expected a list"),
        ('[submission]\nlisten = ["mail.example.org:587"]',
         "submission.listen: 'mail.example.org' is not an IP address"),
        ('[submission]\nlisten = ["0.0.0.0"]',
         "submission.listen: expected \"HOST:PORT\", got '0.0.0.0'"),
        ('[submission]\nlisten = ["0.0.0.0:70000"]',
         "submission.listen: expected a port number 1-65535"),
        ('[submission]\nlisten = ["[::1:587"]',
         "submission.listen: bad IPv6 address in '[::1:587'"),
        ('[smarthost]\nnetworks = "10.0.0.0/8"', "smarthost.networks: expected a list"),
        ('[smarthost]\nnetworks = ["10.0.0.0/33"]',
         "smarthost.networks: '10.0.0.0/33' is not an IP network"),
        ("[smarthost]\nnetworks = [10]",
         'smarthost.networks: expected a network like "10.0.0.0/8"'),
        ('[delivery]\nnameservers = ["dns.example.org"]',
         "delivery.nameservers: expected \"HOST:PORT\", got 'dns.example.org'"),
        ("[delivery]\nsmtp_port = 0", "delivery.smtp_port: expected a port number 1-65535"),
        ("[delivery]\nsmtp_port = true", "delivery.smtp_port: expected a port number 1-65535"),
        ('[delivery]\nrelay = "smtp.example.org"',
         "delivery.relay: expected \"HOST:PORT\", got 'smtp.example.org'"),
        ('[delivery]\nrelay = "smtp example.org:25"',
         "delivery.relay: 'smtp example.org' is not a valid domain name"),
        ("[delivery]\nretry_schedule = []",
         "delivery.retry_schedule: expected a non-empty list of seconds"),
        ('[delivery]\npostmaster = "nobody"',
         "delivery.postmaster: expected an email address or an empty string"),
        ("[delivery]\ndelay_warning_after = -1",
         "delivery.delay_warning_after: expected a non-negative integer"),
        ("[delivery]\nconnect_timeout = 0", "delivery.connect_timeout: expected a positive "
                                            "number of seconds"),
        ('[scanner]\nclamd = "clamd.sock"',
         "scanner.clamd: expected \"tcp:HOST:PORT\" or \"unix:/path\", got 'clamd.sock'"),
        ('[scanner]\nclamd = "tcp:127.0.0.1"',
         "scanner.clamd: expected \"HOST:PORT\", got '127.0.0.1'"),
        ('[scanner]\nblocked_extensions = ["a/b"]',
         "scanner.blocked_extensions: 'a/b' is not a file extension"),
        ("[limits]\nmax_message_size = -5", "limits.max_message_size: expected a positive integer"),
        ("[limits]\nmax_message_size = 1.5", "limits.max_message_size: expected a positive "
                                             "integer"),
        ('[limits]\nmax_message_size = "50M"', "limits.max_message_size: expected a positive "
                                               "integer"),
    ],
)  # fmt: skip
def test_bad_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    assert error(tmp_path, text) == message


def test_proxy_networks(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[submission]\nproxy_networks = ["10.0.0.5/32"]\n'
               '[smarthost]\nproxy_networks = ["10.0.0.0/24", "::1"]\n')  # fmt: skip
    assert [str(n) for n in cfg.submission.proxy_networks] == ["10.0.0.5/32"]
    assert [str(n) for n in cfg.smarthost.proxy_networks] == ["10.0.0.0/24", "::1/128"]
    assert cfg.submissions.proxy_networks == ()
    assert error(tmp_path, '[submissions]\nproxy_networks = ["10.0.0.5/32"]').startswith(
        "submissions.proxy_networks: not supported on the implicit-TLS listener"
    )
    assert error(tmp_path, '[smarthost]\nproxy_networks = ["not a net"]').startswith(
        "smarthost.proxy_networks: "
    )


def test_a_postgresql_directory_url_is_kept_as_given(tmp_path: Path) -> None:
    url = "postgresql://mailgate@db.example.org:5432/mailgate"
    cfg = load(tmp_path, f'[directory]\nurl = "{url}"\n')
    assert (cfg.directory.url, cfg.directory.is_sqlite) == (url, False)


def test_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(
        ConfigError,
        match=r"nope\.toml: configuration file not found \(name it with -c or "
        r"\$MAILGATE_CONFIG, or create one with `mailgate init`\)$",
    ):
        config.load(missing)
    (tmp_path / "mailgate.toml").write_bytes(b'hostname = "\xff"\n')
    with pytest.raises(ConfigError, match=r"mailgate\.toml: cannot read: "):
        config.load(tmp_path / "mailgate.toml")
    assert error(tmp_path, "hostname = ").startswith(f"{tmp_path}/mailgate.toml: invalid TOML: ")


def test_check_files(tmp_path: Path) -> None:
    listen = '[submission]\nlisten = ["127.0.0.1:10587"]\n'
    assert error(tmp_path, listen, check_files=True) == (
        f"tls.cert: file not found: {tmp_path}/tls/cert.pem"
    )
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls/cert.pem").write_text("x")
    assert error(tmp_path, listen, check_files=True) == (
        f"tls.key: file not found: {tmp_path}/tls/key.pem"
    )
    (tmp_path / "tls/key.pem").write_text("x")
    assert load(tmp_path, listen, check_files=True).submission.listen == (
        Listen("127.0.0.1", 10587),
    )
    assert error(tmp_path, "", check_files=True) == (
        "submission.listen: no listener configured in any service"
    )
    # The smart host alone needs no certificate.
    os.unlink(tmp_path / "tls/cert.pem")
    cfg = load(tmp_path, '[smarthost]\nlisten = ["127.0.0.1:10025"]\n', check_files=True)
    assert cfg.smarthost.listen == (Listen("127.0.0.1", 10025),)


# --- [delivery.tls] ------------------------------------------------------------------------


def test_delivery_tls_defaults_and_values(tmp_path: Path) -> None:
    cfg = load(tmp_path, "")
    tls = cfg.delivery.tls
    assert (tls.mta_sts, tls.dane, tls.ca_file, tls.mta_sts_port, tls.policy) == (
        True, True, None, 443, {},
    )  # fmt: skip
    cfg = load(
        tmp_path,
        '[delivery.tls]\nmta_sts = false\ndane = false\nca_file = "ca.pem"\n'
        'mta_sts_port = 8443\npolicy = { "Example.NET" = "verify", "b.test" = "dane" }\n',
    )
    tls = cfg.delivery.tls
    assert (tls.mta_sts, tls.dane, tls.ca_file, tls.mta_sts_port) == (
        False, False, tmp_path / "ca.pem", 8443,
    )  # fmt: skip
    assert tls.policy == {"example.net": "verify", "b.test": "dane"}
    assert load(tmp_path, '[delivery.tls]\nca_file = ""\n').delivery.tls.ca_file is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[delivery.tls]\nmta_sts = 1\n", "delivery.tls.mta_sts: expected true or false"),
        ("[delivery.tls]\nfoo = 1\n", "delivery.tls.foo: unknown key"),
        ("[delivery.tls]\nmta_sts_port = 0\n", "delivery.tls.mta_sts_port: expected a port"),
        ("[delivery.tls]\npolicy = 3\n", "delivery.tls.policy: expected a table"),
        ('[delivery.tls]\npolicy = { "a..b" = "may" }\n', "delivery.tls.policy.a..b: "),
        ("[delivery]\ntls = 1\n", "delivery.tls: expected a table [delivery.tls]"),
    ],
)
def test_delivery_tls_bad_values(tmp_path: Path, text: str, message: str) -> None:
    assert message in error(tmp_path, text)


def test_delivery_tls_ca_file_must_exist(tmp_path: Path) -> None:
    text = ('[smarthost]\nlisten = ["127.0.0.1:2525"]\n'
            '[delivery.tls]\nca_file = "missing.pem"\n')  # fmt: skip
    assert "delivery.tls.ca_file: file not found" in error(tmp_path, text, check_files=True)

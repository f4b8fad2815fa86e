"""Fixtures for the DKIM tests: a data folder with a config, the `mailgate` command run in
process, and the loopback DNS server that publishes what `mailgate domain dns` printed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailgate import config
from mailgate.cli import main
from mailgate.config import Config
from mailgate.directory.store import SqliteDirectory
from tests.dkim.verifier import dnsfunc_for, ensure_ed25519_verifier, serve_zone
from tests.support.dnsserver import DnsServer

HOSTNAME = "mail.example.ac.uk"


@dataclass
class Result:
    status: int
    out: str
    err: str


@dataclass
class Site:
    """One mailgate data folder, its DNS, and helpers to drive `mailgate` against them."""

    path: Path
    dns: DnsServer
    capsys: pytest.CaptureFixture[str]
    published: set[str] = field(default_factory=set)

    @property
    def config_path(self) -> Path:
        return self.path / "mailgate.toml"

    @property
    def cfg(self) -> Config:
        return config.load(self.config_path, check_files=False)

    def run(self, *argv: str) -> Result:
        """`mailgate -c <config> ARGV...` in this process; stdout and stderr captured."""
        self.capsys.readouterr()  # drop anything printed before
        status = main(["-c", str(self.config_path), *argv])
        out, err = self.capsys.readouterr()
        return Result(status, out, err)

    def directory(self) -> SqliteDirectory:
        cfg = self.cfg
        return SqliteDirectory(
            cfg.directory.sqlite_path,
            default_domain=cfg.directory.default_domain,
            data_dir=cfg.base_dir,
        )

    def publish(self, domain: str) -> str:
        """Put exactly what `mailgate domain dns DOMAIN` prints into DNS, replacing what was
        published before (so a removed selector disappears); return the printed text."""
        result = self.run("domain", "dns", domain)
        assert result.status == 0, result.err
        for name in self.published:
            self.dns.remove(name)
        self.published = serve_zone(self.dns, domain + ".", result.out)
        return result.out

    def dnsfunc(self) -> Callable[..., bytes | None]:
        return dnsfunc_for(self.dns)


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


@pytest.fixture
def site(tmp_path: Path, dns_server: DnsServer, capsys: pytest.CaptureFixture[str]) -> Site:
    ensure_ed25519_verifier()
    (tmp_path / "mailgate.toml").write_text(
        f'hostname = "{HOSTNAME}"\n'
        "[directory]\n"
        'url = "sqlite:///state.db"\n'
        'default_domain = "example.ac.uk"\n'
        "[submission]\n"
        'listen = ["127.0.0.1:587"]\n'  # only printed in SRV records: nothing listens here
        "[submissions]\n"
        'listen = ["127.0.0.1:465"]\n'
        "[delivery]\n"
        f'nameservers = ["{dns_server.nameserver}"]\n',
        encoding="utf-8",
    )
    return Site(tmp_path, dns_server, capsys)

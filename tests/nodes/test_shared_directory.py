"""Two `mailgate serve` nodes on one PostgreSQL directory (different ports and spools), and
what a node does when PostgreSQL cannot be reached. Real PostgreSQL, a database per test."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate import replies
from mailgate.directory import migrate
from tests.e2e.conftest import message, submission
from tests.e2e.test_operations import http_get
from tests.support.databases import closed_port_url, postgres_database
from tests.support.gateway import Gateway, run_cli, started
from tests.support.ports import free_port
from tests.support.waiting import wait_for

PASSWORD = "correct horse battery"


def node(root: Path, url: str) -> Gateway:
    return Gateway(root, {"directory": {"url": url}, "server": {"workers": 1}})


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[Gateway, Gateway]]:
    with postgres_database() as url:
        a, b = node(tmp_path / "a", url), node(tmp_path / "b", url)
        out = run_cli(a.config, "directory", "migrate").stdout
        steps = [m.name for m in migrate.migrations("postgresql")]
        assert out.endswith(f" to schema version {len(steps)} ({', '.join(steps)})\n")
        assert run_cli(b.config, "directory", "migrate").stdout.endswith(": nothing to do\n")
        with started(a, b):
            yield a, b


def auth_reply(gw: Gateway, login: str, password: str) -> tuple[int, bytes]:
    client = submission(gw, login=None)
    try:
        return client.docmd("AUTH PLAIN", _plain(login, password))
    finally:
        client.close()


def _plain(login: str, password: str) -> str:
    import base64

    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


def test_a_change_on_one_node_holds_on_the_other(two_nodes: tuple[Gateway, Gateway]) -> None:
    a, b = two_nodes
    a.add_user("carol", PASSWORD)  # through node A's configuration (its CLI)
    assert auth_reply(b, "carol", PASSWORD)[0] == 235
    client = submission(b, login=("carol", PASSWORD))
    try:
        client.sendmail("carol@example.org", ["x@remote.test"], message(frm="carol@example.org"))
    finally:
        client.quit()
    assert len(b.queued()) == 1 and a.queued() == []  # each node its own spool

    # A password change through A: B refuses the old one within 10 s (its cache is dropped).
    a.cli("user", "passwd", "carol", "--password-stdin", stdin="new password\n")
    wait_for(lambda: auth_reply(b, "carol", PASSWORD)[0] == 535, timeout=10.0,
             what="node B refusing the old password")  # fmt: skip
    assert auth_reply(b, "carol", "new password") == (235, b"2.7.0 Authentication successful")

    # Disabled through A: B refuses within 10 s.
    a.cli("user", "disable", "carol")
    wait_for(lambda: auth_reply(b, "carol", "new password")[0] == 535, timeout=10.0,
             what="node B refusing a disabled user")  # fmt: skip
    assert auth_reply(b, "carol", "new password") == (
        replies.BAD_CREDENTIALS.code,
        b"5.7.8 " + replies.BAD_CREDENTIALS.text.encode(),
    )


def test_postgresql_unreachable_answers_454(tmp_path: Path) -> None:
    url = closed_port_url()  # nobody listens there
    gw = Gateway(tmp_path / "gw", {"directory": {"url": url}, "server": {"workers": 1},
                                   "admin": {"listen": [f"127.0.0.1:{free_port()}"]}})  # fmt: skip
    gw.start("--no-delivery")
    try:
        code, text = auth_reply(gw, "alice", PASSWORD)
        assert (code, text) == (454, b"4.7.0 Temporary authentication failure")
        wait_for(lambda: "directory unavailable" in gw.log_text(), timeout=10.0)
        # One line a minute, not one per reconnection attempt.
        assert gw.log_text().count("directory unavailable") == 1
        assert "psycopg.pool" not in gw.log_text()
        # The smart host keeps relaying for its networks (no directory needed).
        with smtplib.SMTP("127.0.0.1", gw.ports["smarthost"], timeout=10) as client:
            client.ehlo("printer.test")
            refused = client.sendmail("printer@example.org", ["x@remote.test"],
                                      message(frm="printer@example.org"))  # fmt: skip
            assert refused == {}
        assert len(gw.queued()) == 1
        # /readyz names the directory (the server started nevertheless).
        status, ready = http_get(gw, "/readyz")
        assert status == 503
        assert f"directory: {url}: cannot connect to the database" in ready, ready
    finally:
        gw.finish()

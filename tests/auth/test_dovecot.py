"""[auth] backend = "dovecot" end to end: Dovecot's real auth service (passwd-file) on a unix
socket and on TCP, and a real `mailgate serve`; smtplib as the client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.auth.conftest import (
    QUIET_GUARD,
    app_password_lifecycle,
    auth_plain,
    connect,
    head_of,
    msmtp,
    swaks,
    swaks_qid,
    try_login,
)
from tests.e2e.conftest import message
from tests.support.dovecot import DovecotAuth
from tests.support.gateway import Gateway

pytestmark = pytest.mark.e2e

OK_AUTH = (235, b"2.7.0 Authentication successful")
BAD = (535, b"5.7.8 Authentication credentials invalid")
UNAVAILABLE = (454, b"4.7.0 Temporary authentication failure")
USERS: dict[str, str | tuple[str, str]] = {
    "dora": "dora's imap password",
    # Dovecot may rename the user (a passdb extra field): that address is the primary one.
    "ed": ("ed's imap password", "user=edward.smith@college.example.org"),
}


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DovecotAuth]:
    server = DovecotAuth(tmp_path_factory.mktemp("dovecot"), USERS)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def dovecot_gateway(root: Path, socket_spec: str) -> Gateway:
    gw = Gateway(root, {"auth": {"backend": "dovecot", "dovecot": {"socket": socket_spec}},
                        "ratelimits": QUIET_GUARD, "server": {"workers": 0}})  # fmt: skip
    gw.cli("domain", "add", "college.example.org")
    return gw


@pytest.fixture(scope="module", params=["unix", "tcp"])
def gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, dovecot: DovecotAuth
) -> Iterator[Gateway]:
    spec = dovecot.unix_spec if request.param == "unix" else dovecot.tcp_spec
    gw = dovecot_gateway(tmp_path_factory.mktemp(f"dovecot-{request.param}"), spec)
    gw.start("--no-delivery")
    try:
        yield gw
    finally:
        gw.finish()


def test_the_right_password_logs_in_as_login_at_default_domain(gateway: Gateway) -> None:
    client = connect(gateway)
    assert auth_plain(client, "dora", USERS["dora"]) == OK_AUTH  # type: ignore[arg-type]
    assert client.mail("dora@example.org") == (250, b"2.1.0 Sender ok")
    client.rcpt("someone@remote.test")
    code, text = client.data(message(frm="dora@gmail.test"))
    client.quit()
    assert code == 250, text
    head = head_of(gateway, text.decode().rsplit(" ", 1)[1])
    assert "(PLAIN:dora)" in head and "\r\nSender: <dora@example.org>" in head


def test_a_user_dovecot_returns_is_the_primary_address(gateway: Gateway) -> None:
    client = connect(gateway)
    assert auth_plain(client, "ed", "ed's imap password") == OK_AUTH
    assert client.mail("edward.smith@college.example.org") == (250, b"2.1.0 Sender ok")
    client.rset()
    code, text = client.docmd("MAIL", "FROM:<dora@example.org>")
    assert (code, text) == (553, b"5.7.1 Sender address not allowed for this login")
    client.quit()


def test_a_wrong_password_and_an_unknown_login_get_the_same_535(gateway: Gateway) -> None:
    assert try_login(gateway, "dora", "not dora's password") == BAD
    assert try_login(gateway, "nobody", "whatever") == BAD


def test_dovecot_stopped_gives_454(tmp_path: Path) -> None:
    server = DovecotAuth(tmp_path / "dovecot", USERS)
    server.start()
    gw = dovecot_gateway(tmp_path / "gw", server.unix_spec)
    gw.start("--no-delivery")
    try:
        assert try_login(gw, "nobody", "whatever") == BAD
        server.stop()
        assert try_login(gw, "dora", "dora's imap password") == UNAVAILABLE
        assert try_login(gw, "dora", "wrong") == UNAVAILABLE  # never 535 while it is down
        server.start()
        assert try_login(gw, "dora", "dora's imap password") == OK_AUTH
        assert "auth unavailable mech=PLAIN login=dora backend=dovecot" in gw.log_text()
    finally:
        gw.finish()
        server.stop()


def test_swaks_and_msmtp_with_a_dovecot_login(gateway: Gateway, tmp_path: Path) -> None:
    qid = swaks_qid(swaks(gateway, "dora", "dora's imap password", "dora@example.org",
                          auth="LOGIN"))  # fmt: skip
    assert "(LOGIN:dora)" in head_of(gateway, qid)
    before = set(gateway.queued())
    proc = msmtp(gateway, tmp_path, "dora", "dora's imap password", "dora@example.org")
    assert proc.returncode == 0, proc.stderr
    [qid] = set(gateway.queued()) - before
    assert "(PLAIN:dora)" in head_of(gateway, qid)
    bad = msmtp(gateway, tmp_path / "bad", "dora", "wrong", "dora@example.org")
    assert bad.returncode != 0 and "535 5.7.8" in bad.stderr


def test_app_passwords_with_a_dovecot_login(gateway: Gateway) -> None:
    app_password_lifecycle(gateway, "dora", "dora@example.org")

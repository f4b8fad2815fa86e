"""[auth] backend = "ldap" end to end: a real slapd (StartTLS, a test CA, a service account)
and a real `mailgate serve`; smtplib as the client."""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
from tests.support.gateway import Gateway
from tests.support.slapd import PEOPLE, SERVICE_DN, Person, Slapd
from tests.support.testca import TestCA
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

CAROL = Person("carol", "carol's ldap password", ("carol@example.org",),
               ("dean@college.example.org",))  # fmt: skip
ERIN = Person("erin", "erin's ldap password", ("erin@example.org",))
FRANK = Person("frank", "frank's ldap password", ("frank@example.org",))
OK_AUTH = (235, b"2.7.0 Authentication successful")
BAD = (535, b"5.7.8 Authentication credentials invalid")
UNAVAILABLE = (454, b"4.7.0 Temporary authentication failure")


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory, ca: TestCA) -> Iterator[Slapd]:
    server = Slapd(tmp_path_factory.mktemp("slapd"), [CAROL, ERIN, FRANK], ca=ca)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def ldap_gateway(root: Path, slapd: Slapd, ca_file: Path, **guard: Any) -> Gateway:
    """A gateway in one process (the AUTH defence counts per process without [state] url)."""
    (root / "secrets").mkdir(parents=True)
    password_file = root / "secrets" / "ldap-bind"
    password_file.write_text(slapd.service_password + "\n")
    ldap = {
        "url": slapd.url, "starttls": True, "ca_file": str(ca_file), "bind_dn": SERVICE_DN,
        "bind_password_file": str(password_file), "base": PEOPLE, "filter": "(uid={login})",
        "address_attribute": "mail", "alias_attributes": ["mailAlternateAddress"],
        "timeout": 3,
    }  # fmt: skip
    gw = Gateway(root / "gw", {"auth": {"backend": "ldap", "ldap": ldap},
                               "ratelimits": {**QUIET_GUARD, **guard},
                               "server": {"workers": 0}})  # fmt: skip
    gw.cli("domain", "add", "college.example.org")
    return gw


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, slapd: Slapd, ca: TestCA
) -> Iterator[Gateway]:
    gw = ldap_gateway(tmp_path_factory.mktemp("ldapgw"), slapd, ca.cert_path)
    gw.start("--no-delivery")
    try:
        yield gw
    finally:
        gw.finish()


def test_the_right_password_logs_in_and_the_mail_attribute_is_the_primary_address(
    gateway: Gateway,
) -> None:
    client = connect(gateway)
    assert auth_plain(client, CAROL.uid, CAROL.password) == OK_AUTH
    client.mail("carol@gmail.test")  # foreign: the envelope sender becomes the primary address
    client.rcpt("someone@remote.test")
    code, text = client.data(message(frm="carol@gmail.test"))
    client.quit()
    assert code == 250, text
    qid = text.decode().rsplit(" ", 1)[1]
    head = head_of(gateway, qid)
    assert "(PLAIN:carol)" in head
    assert "\r\nSender: <carol@example.org>" in head
    assert gateway.envelope(qid).mail_from == "carol@example.org"


def test_a_wrong_password_and_an_unknown_login_get_the_same_535(gateway: Gateway) -> None:
    assert try_login(gateway, CAROL.uid, "not carol's password") == BAD
    assert try_login(gateway, "nobody", "whatever") == BAD
    # An empty password would be an unauthenticated bind, which slapd accepts: the SASL
    # decoder refuses it, and the authenticator would too (tests/unit/test_auth_cache.py).
    assert try_login(gateway, CAROL.uid, "") == (501, b"5.5.2 Cannot decode AUTH parameter")
    assert "auth failed mech=PLAIN login=nobody" in gateway.log_text()


@pytest.mark.parametrize("login", ["*)(uid=*", "*", "carol)(uid=*", "carol*", "c*", "\\2a"])
def test_filter_metacharacters_cannot_widen_the_search(gateway: Gateway, login: str) -> None:
    # Unescaped, "*)(uid=*" would make (uid=*)(uid=*) and match everybody; "c*" would match
    # carol. Escaped (RFC 4515), they name a uid nobody has, with carol's password too.
    assert try_login(gateway, login, CAROL.password) == BAD


def test_an_alias_attribute_is_used_as_from_without_a_sender_stamp(gateway: Gateway) -> None:
    client = connect(gateway)
    assert auth_plain(client, CAROL.uid, CAROL.password) == OK_AUTH
    client.mail("Dean@College.example.org")
    client.rcpt("someone@remote.test")
    code, text = client.data(message(frm="The Dean <dean@college.example.org>"))
    client.quit()
    assert code == 250, text
    qid = text.decode().rsplit(" ", 1)[1]
    assert "\r\nSender:" not in head_of(gateway, qid)
    assert gateway.envelope(qid).mail_from == "Dean@College.example.org"


@pytest.mark.parametrize("address", ["erin@example.org", "bursar@college.example.org"])
def test_a_managed_address_the_entry_does_not_own_gets_553(gateway: Gateway, address: str) -> None:
    client = connect(gateway)
    assert auth_plain(client, CAROL.uid, CAROL.password) == OK_AUTH
    code, text = client.docmd("MAIL", f"FROM:<{address}>")
    assert (code, text) == (553, b"5.7.1 Sender address not allowed for this login")
    client.rset()
    client.mail("carol@example.org")
    client.rcpt("x@remote.test")
    code, text = client.data(message(frm=address))
    assert (code, text[:5]) == (553, b"5.7.1")
    client.quit()


def test_a_grant_adds_an_address_to_an_ldap_login(gateway: Gateway) -> None:
    gateway.cli("address", "add", "admissions@college.example.org", "--owner", ERIN.uid)
    client = connect(gateway)
    assert auth_plain(client, ERIN.uid, ERIN.password) == OK_AUTH
    assert client.mail("admissions@college.example.org") == (250, b"2.1.0 Sender ok")
    client.rset()
    assert client.mail("erin@example.org") == (250, b"2.1.0 Sender ok")  # still the entry's
    client.quit()
    listed = gateway.cli("address", "list", "--owner", ERIN.uid).stdout
    assert "admissions@college.example.org" in listed


def test_slapd_stopped_gives_454_and_its_return_is_noticed(gateway: Gateway, slapd: Slapd) -> None:
    slapd.stop()
    try:
        assert try_login(gateway, FRANK.uid, FRANK.password) == UNAVAILABLE  # never cached
        assert try_login(gateway, FRANK.uid, "wrong") == UNAVAILABLE  # never 535
    finally:
        slapd.start()
    assert try_login(gateway, FRANK.uid, FRANK.password) == OK_AUTH
    assert "auth unavailable mech=PLAIN login=frank backend=ldap" in gateway.log_text()


def test_ldaps_implicit_tls(tmp_path: Path, slapd: Slapd, ca: TestCA) -> None:
    gw = ldap_gateway(tmp_path, slapd, ca.cert_path)
    gw.settings["auth"]["ldap"].update(url=slapd.ldaps_url, starttls=False)
    gw.write_config()
    gw.start("--no-delivery")
    try:
        assert try_login(gw, CAROL.uid, CAROL.password) == OK_AUTH
        assert try_login(gw, CAROL.uid, "wrong") == BAD
    finally:
        gw.finish()


def test_a_server_certificate_from_another_ca_gives_454(
    tmp_path: Path, slapd: Slapd, ca: TestCA
) -> None:
    gw = ldap_gateway(tmp_path, slapd, TestCA(tmp_path / "other-ca").cert_path)
    gw.start("--no-delivery")
    try:
        assert try_login(gw, CAROL.uid, CAROL.password) == UNAVAILABLE
    finally:
        gw.finish()


def test_the_auth_defence_counts_ldap_failures(tmp_path: Path, slapd: Slapd, ca: TestCA) -> None:
    gw = ldap_gateway(tmp_path, slapd, ca.cert_path, auth_refuse_after=3)
    gw.start("--no-delivery")
    try:
        for _ in range(3):
            assert try_login(gw, CAROL.uid, "guess") == BAD
        # Locked out: refused with 4.7.0, even with the right password (at connect or at AUTH).
        with socket.create_connection(("127.0.0.1", gw.ports["submission"]), timeout=10) as s:
            greeting = s.recv(200)
        if greeting.startswith(b"220"):
            code, text = try_login(gw, CAROL.uid, CAROL.password)
        else:
            code, text = int(greeting[:3]), greeting[4:]
        assert code in (421, 454) and text.startswith(b"4.7.0"), (code, text)
    except smtplib.SMTPException as e:
        raise AssertionError(f"unexpected {e!r}") from None
    finally:
        gw.finish()


def test_swaks_and_msmtp_with_an_ldap_login(gateway: Gateway, tmp_path: Path) -> None:
    qid = swaks_qid(swaks(gateway, CAROL.uid, CAROL.password, "dean@college.example.org"))
    head = head_of(gateway, qid)
    assert "(PLAIN:carol)" in head and "\r\nSender:" not in head
    before = set(gateway.queued())
    proc = msmtp(gateway, tmp_path, CAROL.uid, CAROL.password, "carol@example.org")
    assert proc.returncode == 0, proc.stderr
    [qid] = set(gateway.queued()) - before
    assert gateway.envelope(qid).service == "submissions"
    assert "(PLAIN:carol)" in head_of(gateway, qid)
    bad = msmtp(gateway, tmp_path / "bad", CAROL.uid, "wrong", "carol@example.org")
    assert bad.returncode != 0 and "535 5.7.8" in bad.stderr


def test_app_passwords_with_an_ldap_login(gateway: Gateway) -> None:
    app_password_lifecycle(gateway, ERIN.uid, "erin@example.org")  # addresses from LDAP


def test_the_account_breaker_suspends_an_ldap_login(
    tmp_path: Path, slapd: Slapd, ca: TestCA
) -> None:
    gw = ldap_gateway(tmp_path, slapd, ca.cert_path, breaker_recipients_per_hour=3)
    gw.start("--no-delivery")
    try:
        client = connect(gw)
        assert auth_plain(client, FRANK.uid, FRANK.password) == OK_AUTH
        for _ in range(2):  # 4 recipients > 3: the second message trips the breaker
            client.sendmail("frank@example.org", ["a@remote.test", "b@remote.test"],
                            message(frm="frank@example.org"))  # fmt: skip
        client.quit()
        assert "ALERT account suspended login=frank" in gw.log_text()
        assert "suspended=yes" in gw.log_text()  # LDAP login: a users row was made for it
        # The server's directory view learns of it within its poll interval (INTERFACE:
        # "within 10 seconds"); so does it of the operator's `user enable`.
        wait_for(lambda: try_login(gw, FRANK.uid, FRANK.password) == BAD, timeout=15,
                 what="the suspension")  # fmt: skip
        gw.cli("user", "enable", FRANK.uid)
        wait_for(lambda: try_login(gw, FRANK.uid, FRANK.password) == OK_AUTH, timeout=15,
                 what="the login again")  # fmt: skip
    finally:
        gw.finish()

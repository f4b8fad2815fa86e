"""OAUTHBEARER (RFC 7628) and XOAUTH2 end to end: JWT access tokens signed by a test key, the
provider's key set served over HTTPS on loopback, a real `mailgate serve`; smtplib as the
client."""

from __future__ import annotations

import base64
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.auth.conftest import QUIET_GUARD, connect, head_of, msmtp
from tests.e2e.conftest import client_tls, message
from tests.support.gateway import Gateway
from tests.support.jwks import AUDIENCE, ISSUER, Provider
from tests.support.testca import TestCA

pytestmark = pytest.mark.e2e

OK_AUTH = (235, b"2.7.0 Authentication successful")
BAD = (535, b"5.7.8 Authentication credentials invalid")
UNAVAILABLE = (454, b"4.7.0 Temporary authentication failure")


def oauthbearer(token: str, user: str = "") -> str:
    authzid = f"a={user}" if user else ""
    raw = f"n,{authzid},\x01host=mail.example.org\x01port=587\x01auth=Bearer {token}\x01\x01"
    return base64.b64encode(raw.encode()).decode()


def xoauth2(user: str, token: str) -> str:
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def provider(ca: TestCA) -> Iterator[Provider]:
    idp = Provider(ca)
    idp.start()
    try:
        yield idp
    finally:
        idp.stop()


def oauth_gateway(root: Path, jwks_url: str, ca_file: Path) -> Gateway:
    oauth = {"jwks_url": jwks_url, "issuer": ISSUER, "audience": AUDIENCE, "timeout": 3,
             "login_claim": "preferred_username", "ca_file": str(ca_file)}  # fmt: skip
    gw = Gateway(root, {"auth": {"oauth": oauth}, "ratelimits": QUIET_GUARD,
                        "server": {"workers": 0}})  # fmt: skip
    gw.add_user("alice", "alice's password")
    gw.add_user("bob", "bob's password")
    return gw


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, provider: Provider, ca: TestCA
) -> Iterator[Gateway]:
    gw = oauth_gateway(tmp_path_factory.mktemp("oauthgw"), provider.url, ca.cert_path)
    gw.start("--no-delivery")
    try:
        yield gw
    finally:
        gw.finish()


def auth(gw: Gateway, mechanism: str, response: str) -> tuple[int, bytes]:
    client = connect(gw)
    try:
        assert "oauthbearer" in client.esmtp_features["auth"].lower()
        return client.docmd("AUTH", f"{mechanism} {response}")
    finally:
        client.close()


def test_a_valid_token_logs_in_and_the_received_header_names_the_login(
    gateway: Gateway, provider: Provider
) -> None:
    client = connect(gateway)
    assert client.docmd("AUTH", f"OAUTHBEARER {oauthbearer(provider.token('alice'))}") == OK_AUTH
    client.mail("alice@example.org")
    client.rcpt("someone@remote.test")
    code, text = client.data(message())
    client.quit()
    assert code == 250, text
    head = head_of(gateway, text.decode().rsplit(" ", 1)[1])
    assert "(OAUTHBEARER:alice)" in head and "\r\nSender:" not in head


def test_xoauth2_with_a_valid_token(gateway: Gateway, provider: Provider) -> None:
    assert auth(gateway, "XOAUTH2", xoauth2("alice", provider.token("alice"))) == OK_AUTH


def test_an_expired_token_gets_535(gateway: Gateway, provider: Provider) -> None:
    expired = provider.token("alice", expires_in=-600)  # past the 60 s leeway
    assert auth(gateway, "OAUTHBEARER", oauthbearer(expired)) == BAD


def test_a_token_for_another_audience_gets_535(gateway: Gateway, provider: Provider) -> None:
    other = provider.token("alice", audience="another-app")
    assert auth(gateway, "OAUTHBEARER", oauthbearer(other)) == BAD


def test_a_token_with_a_wrong_signature_gets_535(gateway: Gateway, provider: Provider) -> None:
    # Same kid and claims, signed by a key the provider does not publish.
    forged = provider.token("alice", key=rsa.generate_private_key(65537, 2048))
    assert auth(gateway, "OAUTHBEARER", oauthbearer(forged)) == BAD
    # And a token whose signature was cut off, or that is no JWT at all.
    header, payload, _ = provider.token("alice").split(".")
    assert auth(gateway, "OAUTHBEARER", oauthbearer(f"{header}.{payload}.")) == BAD
    assert auth(gateway, "OAUTHBEARER", oauthbearer("not-a-jwt")) == BAD


def test_the_token_decides_who_logs_in(gateway: Gateway, provider: Provider) -> None:
    # A client naming another user than its token's gets 535; so does a token for a login
    # the directory does not have.
    assert auth(gateway, "OAUTHBEARER", oauthbearer(provider.token("alice"), "bob")) == BAD
    assert auth(gateway, "XOAUTH2", xoauth2("bob", provider.token("alice"))) == BAD
    assert auth(gateway, "OAUTHBEARER", oauthbearer(provider.token("mallory"))) == BAD
    assert auth(gateway, "OAUTHBEARER", oauthbearer(provider.token("bob"), "bob")) == OK_AUTH


def test_tokens_are_not_offered_before_tls(gateway: Gateway, provider: Provider) -> None:
    client = smtplib.SMTP("127.0.0.1", gateway.ports["submission"], timeout=30)
    client.ehlo("client.test")
    assert not client.has_extn("auth")
    code, text = client.docmd("AUTH", f"OAUTHBEARER {oauthbearer(provider.token('alice'))}")
    assert (code, text[:5]) == (530, b"5.7.0")
    client.starttls(context=client_tls())
    client.close()


def test_an_unreachable_key_set_gives_454(tmp_path: Path, ca: TestCA, provider: Provider) -> None:
    gw = oauth_gateway(tmp_path, "https://127.0.0.1:9/jwks", ca.cert_path)  # discard port
    gw.start("--no-delivery")
    try:
        assert auth(gw, "OAUTHBEARER", oauthbearer(provider.token("alice"))) == UNAVAILABLE
    finally:
        gw.finish()


@pytest.mark.parametrize("mechanism", ["oauthbearer", "xoauth2"])
def test_msmtp_with_a_token(
    gateway: Gateway, provider: Provider, tmp_path: Path, mechanism: str
) -> None:
    # (swaks 20201014, Debian 12's, has no OAUTHBEARER or XOAUTH2.)
    before = set(gateway.queued())
    token = provider.token("alice")
    proc = msmtp(gateway, tmp_path, "alice", token, "alice@example.org", auth=mechanism)
    assert proc.returncode == 0, proc.stderr
    [qid] = set(gateway.queued()) - before
    assert f"({mechanism.upper()}:alice)" in head_of(gateway, qid)
    expired = provider.token("alice", expires_in=-600)
    bad = msmtp(gateway, tmp_path / "bad", "alice", expired, "alice@example.org", auth=mechanism)
    assert bad.returncode != 0 and "535 5.7.8" in bad.stderr

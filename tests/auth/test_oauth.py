"""OAUTHBEARER (RFC 7628) and XOAUTH2 end to end: JWT access tokens signed by a test key, the
provider's key set served over HTTPS on loopback, a real `mailgate serve`; smtplib (with an auth
object that answers RFC 7628's error challenge) and msmtp as the clients.

A refused token is RFC 7628 §3.2.2's error flow, for XOAUTH2 as for OAUTHBEARER: `334` with the
base64 JSON error, the client's dummy response, then `535 5.7.8`."""

from __future__ import annotations

import base64
import json
import smtplib
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.auth.conftest import QUIET_GUARD, connect, head_of, msmtp, try_login
from tests.e2e.conftest import client_tls, message
from tests.support.gateway import Gateway
from tests.support.jwks import AUDIENCE, ISSUER, Provider
from tests.support.testca import TestCA

pytestmark = pytest.mark.e2e

OK_AUTH = (235, b"2.7.0 Authentication successful")
BAD = (535, b"5.7.8 Authentication credentials invalid")
UNAVAILABLE = (454, b"4.7.0 Temporary authentication failure")
SCOPE = "mailgate-smtp"
DISCOVERY = f"{ISSUER}/.well-known/openid-configuration"
# The error challenge this gateway sends: base64 of this exact JSON text.
ERROR_JSON = ('{"status":"invalid_token","schemes":"bearer","scope":"mailgate-smtp",'
              '"openid-configuration":"https://idp.example.org/realms/staff/.well-known/'
              'openid-configuration"}')  # fmt: skip
ERROR_CHALLENGE = base64.b64encode(ERROR_JSON.encode()).decode()


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


def oauth_gateway(root: Path, jwks_url: str, ca_file: Path, **guard: int) -> Gateway:
    oauth = {"jwks_url": jwks_url, "issuer": ISSUER, "audience": AUDIENCE, "timeout": 3,
             "login_claim": "preferred_username", "ca_file": str(ca_file), "scope": SCOPE,
             "openid_configuration": DISCOVERY}  # fmt: skip
    gw = Gateway(root, {"auth": {"oauth": oauth}, "ratelimits": {**QUIET_GUARD, **guard},
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


def token_auth_object(response: str, dummy: str, seen: list[bytes]) -> Callable[..., str]:
    """An smtplib auth object: `response` (before base64) first, then `dummy` to every
    challenge, which it records."""

    def answer(challenge: bytes | None = None) -> str:
        if challenge is None:
            return response
        seen.append(challenge)
        return dummy

    return answer


def refused(gw: Gateway, mechanism: str, response: str) -> tuple[str, tuple[int, bytes]]:
    """AUTH that must fail through the error flow: the challenge's JSON text and the final reply.
    `response` is the base64 client response; smtplib's auth() wants it decoded."""
    raw = base64.b64decode(response).decode()
    dummy = "\x01" if mechanism == "OAUTHBEARER" else ""  # RFC 7628 §3.2.3; Google's XOAUTH2
    challenges: list[bytes] = []
    client = connect(gw)
    try:
        client.auth(mechanism, token_auth_object(raw, dummy, challenges))
    except smtplib.SMTPAuthenticationError as e:
        [challenge] = challenges
        assert isinstance(e.smtp_error, bytes)
        return challenge.decode(), (e.smtp_code, e.smtp_error)
    finally:
        client.close()
    raise AssertionError(f"{mechanism} was accepted")


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


def test_the_error_challenge_on_the_wire(gateway: Gateway, provider: Provider) -> None:
    # The exact bytes: 334 and the base64 JSON, then 535 5.7.8 after the dummy response.
    expired = provider.token("alice", expires_in=-600)
    client = connect(gateway)
    try:
        code, text = client.docmd("AUTH", f"OAUTHBEARER {oauthbearer(expired)}")
        assert (code, text.decode()) == (334, ERROR_CHALLENGE)
        assert json.loads(base64.b64decode(text)) == {
            "status": "invalid_token", "schemes": "bearer", "scope": SCOPE,
            "openid-configuration": DISCOVERY,
        }  # fmt: skip
        assert client.docmd("AQ==") == BAD
        # The session goes on: a good token logs in on the same connection.
        good = oauthbearer(provider.token("alice"))
        assert client.docmd("AUTH", f"OAUTHBEARER {good}") == OK_AUTH
    finally:
        client.close()


def test_xoauth2_gets_the_same_error_challenge(gateway: Gateway, provider: Provider) -> None:
    expired = provider.token("alice", expires_in=-600)
    client = connect(gateway)
    try:
        assert client.docmd("AUTH", "XOAUTH2") == (334, b"")
        code, text = client.docmd(xoauth2("alice", expired))
        assert (code, text.decode()) == (334, ERROR_CHALLENGE)
        assert client.docmd("") == BAD  # the empty dummy response
    finally:
        client.close()


def test_an_abort_after_the_error_challenge_gets_501(gateway: Gateway, provider: Provider) -> None:
    expired = provider.token("alice", expires_in=-600)
    client = connect(gateway)
    try:
        code, _ = client.docmd("AUTH", f"OAUTHBEARER {oauthbearer(expired)}")
        assert code == 334
        assert client.docmd("*") == (501, b"5.0.0 Authentication cancelled")
    finally:
        client.close()


def test_an_expired_token_gets_535(gateway: Gateway, provider: Provider) -> None:
    expired = provider.token("alice", expires_in=-600)  # past the 60 s leeway
    assert refused(gateway, "OAUTHBEARER", oauthbearer(expired)) == (ERROR_JSON, BAD)
    assert refused(gateway, "XOAUTH2", xoauth2("alice", expired)) == (ERROR_JSON, BAD)


def test_a_token_for_another_audience_gets_535(gateway: Gateway, provider: Provider) -> None:
    other = provider.token("alice", audience="another-app")
    assert refused(gateway, "OAUTHBEARER", oauthbearer(other)) == (ERROR_JSON, BAD)


def test_a_token_with_a_wrong_signature_gets_535(gateway: Gateway, provider: Provider) -> None:
    # Same kid and claims, signed by a key the provider does not publish.
    forged = provider.token("alice", key=rsa.generate_private_key(65537, 2048))
    assert refused(gateway, "OAUTHBEARER", oauthbearer(forged)) == (ERROR_JSON, BAD)
    # And a token whose signature was cut off, or that is no JWT at all.
    header, payload, _ = provider.token("alice").split(".")
    cut = oauthbearer(f"{header}.{payload}.")
    assert refused(gateway, "OAUTHBEARER", cut) == (ERROR_JSON, BAD)
    assert refused(gateway, "OAUTHBEARER", oauthbearer("not-a-jwt")) == (ERROR_JSON, BAD)


def test_the_token_decides_who_logs_in(gateway: Gateway, provider: Provider) -> None:
    # A client naming another user than its token's gets 535; so does a token for a login
    # the directory does not have.
    alice_as_bob = oauthbearer(provider.token("alice"), "bob")
    assert refused(gateway, "OAUTHBEARER", alice_as_bob) == (ERROR_JSON, BAD)
    alice_for_bob = xoauth2("bob", provider.token("alice"))
    assert refused(gateway, "XOAUTH2", alice_for_bob) == (ERROR_JSON, BAD)
    mallory = oauthbearer(provider.token("mallory"))
    assert refused(gateway, "OAUTHBEARER", mallory) == (ERROR_JSON, BAD)
    assert auth(gateway, "OAUTHBEARER", oauthbearer(provider.token("bob"), "bob")) == OK_AUTH


def test_the_auth_defence_counts_a_failed_token_once(
    tmp_path: Path, ca: TestCA, provider: Provider
) -> None:
    # Three failures lock the client out. Two refused tokens and one wrong password make
    # three: each error flow (334, dummy, 535) is one failure, exactly like the password's.
    # Counted twice, the third attempt would already be refused.
    gw = oauth_gateway(tmp_path, provider.url, ca.cert_path, auth_refuse_after=3)
    gw.start("--no-delivery")
    try:
        expired = provider.token("alice", expires_in=-600)
        assert refused(gw, "OAUTHBEARER", oauthbearer(expired)) == (ERROR_JSON, BAD)
        assert refused(gw, "XOAUTH2", xoauth2("alice", expired)) == (ERROR_JSON, BAD)
        assert try_login(gw, "alice", "a wrong password") == BAD
        # Locked out: 4.7.0 even with a good token (at connect, or at AUTH with no challenge).
        with socket.create_connection(("127.0.0.1", gw.ports["submission"]), timeout=10) as s:
            greeting = s.recv(200)
        if greeting.startswith(b"220"):
            code, text = auth(gw, "OAUTHBEARER", oauthbearer(provider.token("alice")))
        else:
            code, text = int(greeting[:3]), greeting[4:]
        assert code in (421, 454) and text.startswith(b"4.7.0"), (code, text)
    finally:
        gw.finish()


def test_tokens_are_not_offered_before_tls(gateway: Gateway, provider: Provider) -> None:
    client = smtplib.SMTP("127.0.0.1", gateway.ports["submission"], timeout=30)
    client.ehlo("client.test")
    assert not client.has_extn("auth")
    code, text = client.docmd("AUTH", f"OAUTHBEARER {oauthbearer(provider.token('alice'))}")
    assert (code, text[:5]) == (530, b"5.7.0")
    client.starttls(context=client_tls())
    client.close()


def test_an_unreachable_key_set_gives_454(tmp_path: Path, ca: TestCA, provider: Provider) -> None:
    # Temporary: 454 4.7.0 at once, no error challenge (nothing was found wrong with the token).
    gw = oauth_gateway(tmp_path, "https://127.0.0.1:9/jwks", ca.cert_path)  # discard port
    gw.start("--no-delivery")
    try:
        assert auth(gw, "OAUTHBEARER", oauthbearer(provider.token("alice"))) == UNAVAILABLE
        assert auth(gw, "XOAUTH2", xoauth2("alice", provider.token("alice"))) == UNAVAILABLE
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
    bad = msmtp(gateway, tmp_path / "bad", "alice", expired, "alice@example.org", auth=mechanism,
                debug=True)  # fmt: skip
    assert bad.returncode != 0 and "535 5.7.8" in bad.stderr
    # msmtp reads the error challenge and answers it (with an empty line, for both mechanisms:
    # not RFC 7628's %x01 for OAUTHBEARER, but the failure is the same), then gets 535.
    transcript = bad.stdout.splitlines()
    challenge = transcript.index(f"<-- 334 {ERROR_CHALLENGE}")
    assert transcript[challenge + 1 : challenge + 3] == [
        "--> ",
        "<-- 535 5.7.8 Authentication credentials invalid",
    ]

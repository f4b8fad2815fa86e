"""Which mail is signed: the policy's decision over the real directory, then the Signer.

The policy (mailgate.policy) decides; these tests check that what `mailgate domain` and
`mailgate address` set up leads to the promised decisions: no grant gives 553 5.7.1 and no
signature; a smart-host client outside the domain's networks gets no signature.
"""

from __future__ import annotations

import ipaddress

import pytest

from mailgate.directory import Directory
from mailgate.errors import Rejected
from mailgate.identity import AuthorField
from mailgate.message import headers
from mailgate.message.authors import read_authors
from mailgate.message.dkim import Signer
from mailgate.policy import FromDecision, Policy, Sender, may_sign_smarthost
from tests.dkim.conftest import Site
from tests.dkim.verifier import verify_all

DOMAIN = "college.example.ac.uk"
MESSAGE = (
    b"From: Bursar <bursar@college.example.ac.uk>\r\n"
    b"To: alice@example.net\r\n"
    b"Subject: Fees\r\n"
    b"\r\n"
    b"Due.\r\n"
)


def froms(address: str) -> tuple[AuthorField, ...]:
    return read_authors(headers.parse(f"From: {address}\r\n\r\n".encode()))


def policy(directory: Directory) -> Policy:
    return Policy(directory, smarthost_networks=[ipaddress.ip_network("10.0.0.0/8")])


def sign_if_decided(directory: Directory, decision: FromDecision) -> bytes:
    """What accept does: sign only for the decided domain."""
    if decision.sign_domain is None:
        return b""
    return Signer(directory).sign(MESSAGE, decision.sign_domain)


@pytest.fixture
def college(site: Site) -> Site:
    assert site.run("domain", "add", DOMAIN, "--allow-network", "10.1.0.0/16").status == 0
    with site.directory() as directory:
        directory.add_user("clerk", "clerk@example.ac.uk", "correct horse battery")
        directory.add_user("bursar", "bursar@example.ac.uk", "correct horse battery")
    assert site.run("address", "add", f"bursar@{DOMAIN}", "--owner", "bursar").status == 0
    site.publish(DOMAIN)
    return site


def test_user_without_a_grant_gets_553_and_nothing_is_signed(college: Site) -> None:
    with college.directory() as directory, pytest.raises(Rejected) as refused:
        policy(directory).check_identity(
            Sender("submission", "192.0.2.7", "clerk"), froms(f"bursar@{DOMAIN}")
        )
    assert (refused.value.reply.code, refused.value.reply.status) == (553, "5.7.1")


def test_user_with_a_grant_is_signed_and_verifies(college: Site) -> None:
    with college.directory() as directory:
        decision = policy(directory).check_identity(
            Sender("submission", "192.0.2.7", "bursar"), froms(f"bursar@{DOMAIN}")
        )
        assert decision == FromDecision(None, DOMAIN)
        signature = sign_if_decided(directory, decision)
    assert verify_all(signature + MESSAGE, college.dnsfunc()) == [True]


def test_domain_wide_grant_signs_every_address(college: Site) -> None:
    assert college.run("address", "add", f"*@{DOMAIN}", "--owner", "clerk").status == 0
    with college.directory() as directory:
        decision = policy(directory).check_identity(
            Sender("submission", "192.0.2.7", "clerk"), froms(f"admissions@{DOMAIN}")
        )
    assert decision.sign_domain == DOMAIN


@pytest.mark.parametrize(("client", "signed"), [("10.2.0.5", False), ("10.1.4.5", True)])
def test_smarthost_client_is_signed_only_from_an_allowed_network(
    college: Site, client: str, signed: bool
) -> None:
    with college.directory() as directory:
        decision = policy(directory).check_identity(
            Sender("smarthost", client, None), froms(f"bursar@{DOMAIN}")
        )
        signature = sign_if_decided(directory, decision)
        domain = directory.get_domain(DOMAIN)
    assert domain is not None and may_sign_smarthost(domain, client) is signed
    assert decision.sign_domain == (DOMAIN if signed else None)
    assert (signature != b"") is signed
    if signed:
        assert verify_all(signature + MESSAGE, college.dnsfunc()) == [True]

"""The sender policy of INTERFACE.md, as plain function calls with an in-memory directory."""

from __future__ import annotations

import ipaddress

import pytest

from mailgate import replies
from mailgate.errors import Rejected
from mailgate.identity import AuthorField
from mailgate.message import headers
from mailgate.message.authors import read_authors
from mailgate.policy import Policy, Sender, may_sign_smarthost
from mailgate.values import Domain
from tests.support.memdir import MemoryDirectory


def authors(*fields: str) -> tuple[AuthorField, ...]:
    """The author fields of a header section made of `fields` ("From: a@b.test", ...)."""
    section = headers.parse("".join(f + "\r\n" for f in fields).encode() + b"\r\nbody\r\n")
    return read_authors(section)


def froms(*addresses: str) -> tuple[AuthorField, ...]:
    return authors(*(f"From: {a}" for a in addresses))


@pytest.fixture
def policy() -> Policy:
    d = MemoryDirectory("example.org")
    d.add_user("alice", "", "pw")
    d.add_user("bob", "", "pw")
    d.add_domain("college.example.org")
    d.grant("bursar@college.example.org", "alice")
    d.grant("*@lab.example.org", "bob")
    d.add_domain("lab.example.org")
    return Policy(d, smarthost_networks=[ipaddress.ip_network("10.0.0.0/8")])


ALICE = Sender("submission", "192.0.2.1", "alice")


def test_own_and_granted_addresses_are_kept(policy: Policy) -> None:
    assert policy.check_sender(ALICE, "alice@example.org") == "alice@example.org"
    assert policy.check_sender(ALICE, "Bursar@College.example.org") == "Bursar@College.example.org"


def test_domain_wide_grant(policy: Policy) -> None:
    bob = Sender("submission", "192.0.2.1", "bob")
    assert policy.check_sender(bob, "anyone@lab.example.org") == "anyone@lab.example.org"


def test_foreign_envelope_sender_becomes_primary(policy: Policy) -> None:
    assert policy.check_sender(ALICE, "alice@gmail.test") == "alice@example.org"


def test_null_sender_left_alone(policy: Policy) -> None:
    assert policy.check_sender(ALICE, "") == ""


@pytest.mark.parametrize("address", ["bob@example.org", "bursar@lab.example.org",
                                     "dean@college.example.org"])  # fmt: skip
def test_managed_address_not_granted_is_553(policy: Policy, address: str) -> None:
    with pytest.raises(Rejected) as e:
        policy.check_sender(ALICE, address)
    assert e.value.reply == replies.SENDER_NOT_ALLOWED
    assert (e.value.reply.code, e.value.reply.status) == (553, "5.7.1")


def test_from_header_rules(policy: Policy) -> None:
    own = policy.check_identity(ALICE, froms("alice@example.org"))
    assert own.sender_header is None and own.sign_domain == "example.org"
    granted = policy.check_identity(ALICE, froms("bursar@college.example.org"))
    assert granted.sender_header is None and granted.sign_domain == "college.example.org"
    foreign = policy.check_identity(ALICE, froms("alice@gmail.test"))
    assert foreign.sender_header == "alice@example.org" and foreign.sign_domain is None
    missing = policy.check_identity(ALICE, ())
    assert missing.sender_header == "alice@example.org"
    with pytest.raises(Rejected) as e:
        policy.check_identity(ALICE, froms("bob@example.org"))
    assert e.value.reply == replies.SENDER_NOT_ALLOWED


def test_smarthost_relay_rule(policy: Policy) -> None:
    policy.check_rcpt(Sender("smarthost", "10.1.2.3"), "x@remote.test")
    policy.check_rcpt(Sender("smarthost", "::ffff:10.1.2.3"), "x@remote.test")
    with pytest.raises(Rejected) as e:
        policy.check_rcpt(Sender("smarthost", "192.0.2.7"), "x@remote.test")
    assert e.value.reply == replies.RELAY_DENIED


def test_smarthost_sender_is_not_rewritten(policy: Policy) -> None:
    lab = Sender("smarthost", "10.1.2.3")
    assert policy.check_sender(lab, "bob@example.org") == "bob@example.org"
    decision = policy.check_identity(lab, froms("bursar@college.example.org"))
    assert decision.sign_domain is None  # the domain lists no smart-host network


def test_backend_addresses_count_like_grants_and_the_first_is_primary(policy: Policy) -> None:
    # An LDAP login: mail and mailAlternateAddress from its entry, no users row of its own.
    carol = Sender("submission", "192.0.2.1", "carol",
                   addresses=("carol@example.org", "Dean@College.example.org"))  # fmt: skip
    assert policy.check_sender(carol, "dean@college.example.org") == "dean@college.example.org"
    assert policy.check_sender(carol, "carol@gmail.test") == "carol@example.org"
    assert policy.check_identity(carol, froms("dean@college.example.org")).sender_header is None
    decision = policy.check_identity(carol, froms("carol@gmail.test"))
    assert decision.sender_header == "carol@example.org"
    for address in ("alice@example.org", "bursar@college.example.org"):
        with pytest.raises(Rejected) as e:
            policy.check_sender(carol, address)
        assert e.value.reply == replies.SENDER_NOT_ALLOWED


def test_grants_add_to_backend_addresses(policy: Policy) -> None:
    # alice's users row and grants still count when a backend vouches for other addresses.
    alice = Sender("submission", "192.0.2.1", "alice", addresses=("a.smith@example.org",))
    assert policy.check_sender(alice, "bursar@college.example.org") == "bursar@college.example.org"
    assert policy.check_sender(alice, "a.smith@example.org") == "a.smith@example.org"
    assert policy.check_sender(alice, "x@gmail.test") == "a.smith@example.org"


# --- may_sign_smarthost ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("networks", "client", "expected"),
    [
        (("10.1.0.0/16",), "10.1.2.3", True),
        (("10.1.0.0/16",), "10.2.0.1", False),
        (("10.1.0.0/16",), "::ffff:10.1.2.3", True),  # IPv4 client on a dual-stack listener
        (("2001:db8:1::/48",), "2001:db8:1::25", True),
        (("2001:db8:1::/48",), "2001:db8:2::25", False),
        (("2001:db8:1::/48",), "fe80::1%eth0", False),
        (("fe80::/64",), "fe80::1%eth0", True),  # zone index ignored
        (("10.1.2.3",), "10.1.2.3", True),  # a single host
        (("not-a-network", "10.1.0.0/16"), "10.1.0.9", True),  # a bad entry is skipped
        ((), "10.1.2.3", False),  # no networks listed: never signed
        (("10.1.0.0/16",), "not-an-ip", False),
    ],
)
def test_may_sign_smarthost(networks: tuple[str, ...], client: str, expected: bool) -> None:
    domain = Domain("college.example.ac.uk", smarthost_networks=networks)
    assert may_sign_smarthost(domain, client) is expected

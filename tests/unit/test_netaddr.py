"""The one network-address rule (netaddr.py): IPv4-mapped counts as IPv4, then membership."""

from __future__ import annotations

import ipaddress

import pytest

from mailgate import tracelog
from mailgate.limits.keys import network_key
from mailgate.netaddr import address_literal, in_networks, network_of, parse_address

NETS = (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32"))


@pytest.mark.parametrize(
    ("text", "inside"),
    [
        ("192.0.2.7", True),
        ("::ffff:192.0.2.7", True),  # a dual-stack listener's IPv4 client
        ("[::ffff:192.0.2.7]", True),
        ("2001:db8::1", True),
        ("fe80::1%eth0", False),
        ("198.51.100.1", False),
        ("::ffff:198.51.100.1", False),
        ("::c000:207", False),  # IPv4-compatible, not mapped: not 192.0.2.7
        ("unknown", False),
        ("", False),
    ],
)
def test_membership_counts_mapped_addresses_as_ipv4(text: str, inside: bool) -> None:
    assert in_networks(text, NETS) is inside
    parsed = parse_address(text)
    if parsed is not None:
        assert in_networks(parsed, NETS) is inside


def test_parse_address() -> None:
    assert parse_address("::ffff:192.0.2.1") == ipaddress.ip_address("192.0.2.1")
    assert parse_address(" [2001:db8::1] ") == ipaddress.ip_address("2001:db8::1")
    assert parse_address("fe80::1%eth0") == ipaddress.ip_address("fe80::1")
    assert parse_address("/run/mailgate.sock") is None
    assert not in_networks("192.0.2.7", ())


@pytest.mark.parametrize(
    ("client", "network"),
    [
        ("192.0.2.7", "192.0.2.0/24"),
        ("::ffff:192.0.2.7", "192.0.2.0/24"),  # one client, one network, however it is written
        ("2001:db8:1:2::25", "2001:db8:1:2::/64"),
    ],
)
def test_one_network_for_rate_limits_and_the_event_log(client: str, network: str) -> None:
    assert network_key(client, 24, 64) == tracelog.network(client) == network
    address = parse_address(client)
    assert address is not None and network_of(address, 32, 128) == str(address)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("[192.0.2.1]", "192.0.2.1"),
        ("[IPv6:2001:db8::1]", "2001:db8::1"),
        ("[ipv6:::ffff:10.0.0.1]", "::ffff:a00:1"),  # as written: policy unmaps it
        ("[IPv6:fe80::1%eth0]", None),  # RFC 5321 has no scope ids
        ("[tag:content]", None),
        ("192.0.2.1", None),
        ("[300.0.0.1]", None),
    ],
)
def test_address_literal(text: str, address: str | None) -> None:
    found = address_literal(text)
    assert (None if found is None else str(found)) == address

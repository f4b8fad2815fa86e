"""The one network-address rule (netaddr.py): IPv4-mapped counts as IPv4, then membership."""

from __future__ import annotations

import ipaddress

import pytest

from mailgate.netaddr import in_networks, parse_address

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

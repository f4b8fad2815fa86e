"""receive/proxy.py: PROXY protocol v1 and v2 headers, parsed without I/O."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.receive import proxy
from mailgate.receive.proxy import ProxyError, ProxyHeader, build_v1, build_v2, parse

CLIENT = ("192.0.2.7", 51234)
SERVER = ("198.51.100.1", 587)


def test_v1_tcp4_and_what_follows() -> None:
    data = b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 587\r\nEHLO x\r\n"
    header = parse(data)
    assert header == ProxyHeader(45, CLIENT, SERVER)
    assert data[header.length :] == b"EHLO x\r\n"


def test_v1_tcp6_and_unknown() -> None:
    header = parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 587\r\n")
    assert header is not None and header.source == ("2001:db8::7", 51234)
    assert parse(b"PROXY UNKNOWN ffff::1 whatever\r\n") == ProxyHeader(32, None, None)


@pytest.mark.parametrize(
    "data",
    [
        b"PROXY TCP4 192.0.2.7 198.51.100.1 51234\r\n",  # a field missing
        b"PROXY TCP4 2001:db8::7 198.51.100.1 1 2\r\n",  # IPv6 in TCP4
        b"PROXY TCP4 192.0.2.7 198.51.100.1 051234 587\r\n",  # leading zero
        b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 587\r\n",  # port out of range
        b"PROXY UDP4 192.0.2.7 198.51.100.1 1 2\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\n",  # bare LF
        b"PROXY " + b"9" * 120,  # no CRLF within 107 octets
        b"EHLO client.test\r\n",  # not a header at all
    ],
)
def test_v1_malformed(data: bytes) -> None:
    with pytest.raises(ProxyError):
        parse(data)


def test_partial_headers_need_more_bytes() -> None:
    for whole in (build_v1(CLIENT, SERVER), build_v2(CLIENT, SERVER)):
        for n in range(len(whole)):
            assert parse(whole[:n]) is None, (whole, n)
        assert parse(whole) is not None


def test_v2_tcp4_tcp6_local_and_tlvs() -> None:
    assert parse(build_v2(CLIENT, SERVER)) == ProxyHeader(28, CLIENT, SERVER)
    six = parse(build_v2(("2001:db8::7", 1), ("2001:db8::1", 2)))
    assert six is not None and six.source == ("2001:db8::7", 1)
    mapped = parse(build_v2(("::ffff:192.0.2.7", 1), ("::ffff:198.51.100.1", 2)))
    assert mapped is not None and mapped.source == ("192.0.2.7", 1)
    local = proxy.V2_SIGNATURE + bytes([0x20, 0x00, 0x00, 0x00])
    assert parse(local + b"rest") == ProxyHeader(16, None, None)
    # TLVs after the addresses (e.g. PP2_TYPE_AUTHORITY) are skipped, not misread.
    base = build_v2(CLIENT, SERVER)
    tlv = bytes([0x02, 0x00, 0x03]) + b"abc"
    with_tlv = base[:14] + (len(base) - 16 + len(tlv)).to_bytes(2, "big") + base[16:] + tlv
    assert parse(with_tlv + b"EHLO") == ProxyHeader(34, CLIENT, SERVER)


@pytest.mark.parametrize(
    "data",
    [
        proxy.V2_SIGNATURE + bytes([0x11, 0x11, 0x00, 0x0C]) + bytes(12),  # version 1
        proxy.V2_SIGNATURE + bytes([0x2F, 0x11, 0x00, 0x0C]) + bytes(12),  # command 15
        proxy.V2_SIGNATURE + bytes([0x21, 0x11, 0x00, 0x04]) + bytes(4),  # too short for TCP4
        proxy.V2_SIGNATURE + bytes([0x21, 0x11, 0xFF, 0xFF]),  # absurd length
    ],
)
def test_v2_malformed(data: bytes) -> None:
    with pytest.raises(ProxyError):
        parse(data)


def test_is_header_start() -> None:
    assert proxy.is_header_start(build_v1(CLIENT, SERVER))
    assert proxy.is_header_start(build_v2(CLIENT, SERVER))
    assert not proxy.is_header_start(b"EHLO client.test\r\n")
    assert not proxy.is_header_start(b"\r\n")


addresses = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str).filter(lambda a: ipaddress.IPv6Address(a).ipv4_mapped is None),
)
ports = st.integers(min_value=0, max_value=65535)


@given(addresses, ports, ports, st.binary(max_size=40), st.booleans())
def test_round_trip(address: str, sport: int, dport: int, rest: bytes, v2: bool) -> None:
    family = ipaddress.ip_address(address).version
    destination = "192.0.2.1" if family == 4 else "2001:db8::1"
    build = build_v2 if v2 else build_v1
    data = build((address, sport), (destination, dport)) + rest
    header = parse(data)
    assert header is not None
    assert header.source == (address, sport)
    assert data[header.length :] == rest


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_proxy_error(data: bytes) -> None:
    try:
        header = parse(data)
    except ProxyError:
        return
    assert header is None or 0 < header.length <= len(data)

"""The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2), sans-IO.

Owns: recognising and parsing the header a load balancer sends before anything else on a
connection, so that the real client's address can replace the balancer's. Must not: do I/O,
read the clock, or decide whom to trust (receive/channel.py accepts a header only from a peer
inside the listener's `proxy_networks`, and refuses one from anybody else).

    result = parse(buffer)      # None: need more bytes; raises ProxyError when malformed
    result.source               # ("192.0.2.7", 51234), or None for LOCAL/UNKNOWN (health checks)
    buffer[result.length:]      # what followed the header: the client's first bytes

Version 1 (text): "PROXY TCP4|TCP6|UNKNOWN src dst sport dport\\r\\n", at most 107 octets.
Version 2 (binary): a 12-octet signature, version/command, family/protocol, a 16-bit length,
the addresses, then TLVs (ignored). Only TCP over IPv4/IPv6 carries an address; LOCAL and
UNSPEC mean "use the connection's own address".
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from mailgate.netaddr import unmapped

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # proxy-protocol.txt §2.1: the worst case, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_HEADER = struct.Struct("!12sBBH")  # signature, version+command, family+protocol, length
_V2_MAX_LENGTH = 16 + 2048  # addresses plus generous TLVs; larger is not a balancer
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21
_V2_CMD_LOCAL = 0x0
_V2_CMD_PROXY = 0x1


class ProxyError(Exception):
    """The bytes are not a valid PROXY header; the message says why (for the log)."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    length: int  # octets of the header, to drop from the buffer
    source: tuple[str, int] | None  # the client; None: keep the connection's own address
    destination: tuple[str, int] | None  # the address the client connected to


def is_header_start(data: bytes) -> bool:
    """True when `data` (the first bytes of a connection) starts with a PROXY signature."""
    return data.startswith((V1_PREFIX, V2_SIGNATURE))


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of `data`, None when more bytes are needed."""
    if data[: len(V2_SIGNATURE)] == V2_SIGNATURE[: len(data)]:
        return _parse_v2(data) if len(data) >= _V2_HEADER.size else None
    if data[: len(V1_PREFIX)] == V1_PREFIX[: len(data)]:
        return _parse_v1(data)
    raise ProxyError("no PROXY header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH or b"\n" in data[:V1_MAX_LENGTH]:
            raise ProxyError("v1 header without CRLF within 107 octets")
        return None
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyError("v1 header is not ASCII") from None
    fields = line.split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return ProxyHeader(end + 2, None, None)  # §2.1: the rest of the line is ignored
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyError("v1 header is not PROXY TCP4|TCP6 src dst sport dport")
    version = 4 if fields[1] == "TCP4" else 6
    source = (_address(fields[2], version), _port(fields[4]))
    destination = (_address(fields[3], version), _port(fields[5]))
    return ProxyHeader(end + 2, source, destination)


def _address(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyError(f"v1 header: {text!r} is not an IPv{version} address") from None
    if address.version != version:
        raise ProxyError(f"v1 header: {text!r} is not an IPv{version} address")
    return str(address)


def _port(text: str) -> int:
    # §2.1: a decimal number without leading zeroes, 0-65535.
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0"):
        raise ProxyError(f"v1 header: {text!r} is not a port")
    port = int(text)
    if port > 65535:
        raise ProxyError(f"v1 header: {text!r} is not a port")
    return port


def _parse_v2(data: bytes) -> ProxyHeader | None:
    _, version_command, family, length = _V2_HEADER.unpack_from(data)
    if version_command >> 4 != 2:
        raise ProxyError(f"v2 header with version {version_command >> 4}")
    command = version_command & 0x0F
    if command not in (_V2_CMD_LOCAL, _V2_CMD_PROXY):
        raise ProxyError(f"v2 header with unknown command {command}")
    if length > _V2_MAX_LENGTH:
        raise ProxyError(f"v2 header of {length} octets")
    total = _V2_HEADER.size + length
    if len(data) < total:
        return None
    body = data[_V2_HEADER.size : total]
    if command == _V2_CMD_LOCAL:
        return ProxyHeader(total, None, None)  # the balancer's own connection (health check)
    if family == _V2_TCP4:
        if length < 12:
            raise ProxyError("v2 TCP4 header too short")
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", body)
        return ProxyHeader(total, (str(ipaddress.IPv4Address(src)), sport),
                           (str(ipaddress.IPv4Address(dst)), dport))  # fmt: skip
    if family == _V2_TCP6:
        if length < 36:
            raise ProxyError("v2 TCP6 header too short")
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", body)
        return ProxyHeader(total, (_v6(src), sport), (_v6(dst), dport))
    # UNSPEC, UDP, Unix sockets: nothing we can use as a client address (§2.2: accept, ignore).
    return ProxyHeader(total, None, None)


def _v6(packed: bytes) -> str:
    return str(unmapped(ipaddress.IPv6Address(packed)))


def build_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v1 header (for tests and tools)."""
    family = "TCP6" if ":" in source[0] else "TCP4"
    return (f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
            .encode("ascii"))  # fmt: skip


def build_v2(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v2 PROXY TCP header (for tests and tools)."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    family = _V2_TCP6 if src.version == 6 else _V2_TCP4
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    return _V2_HEADER.pack(V2_SIGNATURE, 0x20 | _V2_CMD_PROXY, family, len(body)) + body

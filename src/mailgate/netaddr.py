"""IP addresses of clients and peers: parsing them, and testing network membership.

Owns: the one rule that an IPv4-mapped IPv6 address (::ffff:a.b.c.d, how a dual-stack listener
reports IPv4 clients) counts as the IPv4 address it carries, that a network only ever contains
addresses of its own version, the network a client is counted or grouped in (its /24 or /64,
`network_of`), and the syntax of an address literal (RFC 5321 §4.1.3). Must not: import anything
else from mailgate, resolve names, or do any I/O.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def unmapped(address: IPAddress) -> IPAddress:
    """`address`, or the IPv4 address an IPv4-mapped IPv6 address carries."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# Asked several times for every message about the same few client addresses (the limits, the
# smart host's networks, the event log's grouping); the answers are immutable values.
@functools.lru_cache(maxsize=4096)
def parse_address(text: str) -> IPAddress | None:
    """`text` (a peer address, perhaps in brackets or with a scope id) as an IP address,
    IPv4-mapped ones as IPv4; None when it is not an IP address (a Unix socket peer, "")."""
    bare = text.strip().removeprefix("[").removesuffix("]").split("%", 1)[0]
    try:
        return unmapped(ipaddress.ip_address(bare))
    except ValueError:
        return None


def in_networks(address: str | IPAddress, networks: Iterable[IPNetwork]) -> bool:
    """Whether `address` (text or parsed; IPv4-mapped counts as IPv4) lies in one of
    `networks`. Text that is not an IP address lies in none."""
    ip = parse_address(address) if isinstance(address, str) else unmapped(address)
    if ip is None:
        return False
    return any(ip.version == net.version and ip in net for net in networks)


@functools.lru_cache(maxsize=4096)
def network_of(address: IPAddress, ipv4_prefix: int, ipv6_prefix: int) -> str:
    """The network `address` (unmapped, see `parse_address`) lies in: '192.0.2.0/24',
    '2001:db8:1:2::/64'; the address itself ('192.0.2.7') when the prefix covers all of it."""
    prefix = ipv4_prefix if address.version == 4 else ipv6_prefix
    if prefix >= address.max_prefixlen:
        return str(address)  # one host: '192.0.2.7' reads better than '192.0.2.7/32'
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def address_literal(text: str) -> IPAddress | None:
    """The address of an RFC 5321 §4.1.3 address literal, `[192.0.2.1]` or `[IPv6:2001:db8::1]`
    (the tag in any case), as written (not unmapped); None for anything else: a name, a general
    literal, a scope id (which `ipaddress` would accept and RFC 5321 does not)."""
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    try:
        if inner[:5].upper() == "IPV6:":
            return None if "%" in inner else ipaddress.IPv6Address(inner[5:])
        return ipaddress.IPv4Address(inner)
    except ValueError:
        return None

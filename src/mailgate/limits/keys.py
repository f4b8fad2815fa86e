"""How clients and logins are named in counters: the network key and the login key.

Owns: turning a client IP into the network it is counted as (an IPv4 /24 or an IPv6 /64 by
default: one host rarely has one address, and IPv6 hands a whole /64 to a single site) and
normalising a login. Must not: keep state or read the clock (the cache below only remembers
answers of a pure function).
"""

from __future__ import annotations

import functools

from mailgate.netaddr import network_of, parse_address

# An attacker chooses the login string; a bounded length keeps counters' memory bounded.
MAX_LOGIN_KEY = 256


@functools.lru_cache(maxsize=4096)  # asked several times per message; parsing an IP is not cheap
def network_key(ip: str, ipv4_prefix: int, ipv6_prefix: int) -> str:
    """The network `ip` is counted as: '192.0.2.0/24', '2001:db8:1:2::/64' ('192.0.2.7' for /32).

    An IPv4-mapped IPv6 address counts as the IPv4 address it carries (a dual-stack listener
    reports IPv4 clients that way). Anything that is not an IP address (a Unix socket peer,
    "") is its own key, so it is still counted, just not grouped.
    """
    address = parse_address(ip)
    if address is None:
        return ip[:MAX_LOGIN_KEY]
    return network_of(address, ipv4_prefix, ipv6_prefix)


def login_key(login: str) -> str:
    """Logins compare case-insensitively, as the directory looks them up."""
    return login.strip().lower()[:MAX_LOGIN_KEY]


def printable(text: str) -> str:
    """A value safe for one key=value log line or report cell: no spaces, no control characters."""
    return "".join(ch if ch.isprintable() and not ch.isspace() else "?" for ch in text)[:200]

"""The one place where dnspython resolvers are built from `delivery.nameservers`.

Owns: turning the configured name servers ("IP" / "IP:PORT", empty for the system's) and a time
budget into a resolver, synchronous or asynchronous, optionally asking for DNSSEC validation
results. Must not: import anything from mailgate, or decide what an answer means.

DNSSEC (RFC 4035 §3.2.3, RFC 6840 §5.7): with `dnssec=True` queries carry the DO bit and the AD
bit, so that a validating resolver reports in the AD bit of its answer whether the data was
validated. mailgate never validates signatures itself: it trusts the AD bit of the configured
resolvers only (see `is_trusted`), as Postfix does with `smtp_dns_support_level = dnssec`.
"""

from __future__ import annotations

from collections.abc import Sequence

import dns.asyncresolver
import dns.flags
import dns.message
import dns.nameserver
import dns.resolver

EDNS_PAYLOAD = 1232  # octets: the DNS flag day 2020 size, avoids IP fragmentation


def make_async_resolver(
    nameservers: Sequence[tuple[str, int]], timeout: float, *, dnssec: bool = False
) -> dns.asyncresolver.Resolver:
    """An async resolver over `nameservers` (else /etc/resolv.conf) whose whole lookup, all
    retries included, takes at most `timeout` seconds."""
    resolver = dns.asyncresolver.Resolver(configure=not nameservers)
    _configure(resolver, nameservers, timeout, dnssec)
    return resolver


def make_resolver(
    nameservers: Sequence[tuple[str, int]], timeout: float, *, dnssec: bool = False
) -> dns.resolver.Resolver:
    """The synchronous twin of `make_async_resolver` (for CLI commands)."""
    resolver = dns.resolver.Resolver(configure=not nameservers)
    _configure(resolver, nameservers, timeout, dnssec)
    return resolver


def is_trusted(nameservers: Sequence[tuple[str, int]]) -> bool:
    """Whether AD bits may be believed: only from name servers the operator configured (the
    system's resolv.conf may point anywhere, e.g. a DHCP-supplied forwarder)."""
    return bool(nameservers)


def is_authenticated(answer: dns.resolver.Answer) -> bool:
    """The AD bit of the response that carried `answer` (RFC 4035 §3.2.3)."""
    response = answer.response
    return isinstance(response, dns.message.Message) and bool(response.flags & dns.flags.AD)


def _configure(
    resolver: dns.resolver.BaseResolver,
    nameservers: Sequence[tuple[str, int]],
    timeout: float,
    dnssec: bool,
) -> None:
    if nameservers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in nameservers]
    # One budget for a whole lookup (all retries), so that a dead resolver costs bounded time.
    resolver.lifetime = timeout
    resolver.timeout = min(resolver.timeout, timeout)
    if dnssec:
        resolver.use_edns(0, dns.flags.DO, EDNS_PAYLOAD)
        resolver.flags = dns.flags.RD | dns.flags.AD

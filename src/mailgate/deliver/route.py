"""Where mail for a recipient domain goes: MX lookup, implicit MX, null MX, or the relay.

Owns: turning a destination (a recipient domain, or the configured `delivery.relay`) into an
ordered list of (host name, IP address, port) to try, and classifying DNS failures as
permanent or temporary. Must not: open SMTP connections, or touch the spool.

RFC 5321 §5.1 (MX preference order, random among equal preferences, implicit MX: the domain's
own A/AAAA when it has no MX records), RFC 7505 (null MX `MX 0 .`: no mail, fail at once with
556 5.1.10), RFC 3463 (5.1.2 bad destination system, 4.4.3 directory server failure).
NXDOMAIN for the recipient domain is permanent; SERVFAIL, timeouts and anything unexpected are
temporary (STYLE.md §6). Answers are cached for their TTL (at most 5 minutes) so that a burst
of messages to one domain costs one lookup.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from mailgate.config import DeliveryConfig
from mailgate.dnsresolver import is_authenticated, is_trusted, make_async_resolver
from mailgate.identity import BadDomain, normalize
from mailgate.netaddr import IPNetwork, in_networks
from mailgate.replies import Reply

log = logging.getLogger(__name__)

RELAY_KEY = "[relay]"  # the destination key of everything when delivery.relay is set
MAX_CACHE_TTL = 300.0  # seconds; RFC 1035 TTLs are honoured up to this
MIN_CACHE_TTL = 5.0
ERROR_CACHE_TTL = 10.0  # a failed lookup is not repeated for each message of a burst
MAX_MX_HOSTS = 10  # like Postfix's smtp_mx_address_limit-ish: bound the work per destination

DOMAIN_NOT_FOUND = Reply(550, "5.1.2", "Host or domain name not found (NXDOMAIN)")
NULL_MX = Reply(556, "5.1.10", "Recipient domain does not accept mail (null MX, RFC 7505)")
NO_ADDRESS = Reply(550, "5.4.4", "Unable to route: no MX or address records for the domain")
DNS_TEMPFAIL = Reply(451, "4.4.3", "Temporary DNS failure, will retry")
MX_HOSTS_UNRESOLVED = Reply(451, "4.4.3", "No address found for any MX host, will retry")
BAD_DOMAIN = Reply(550, "5.1.2", "Bad destination domain")
MX_IN_BAD_NETS = Reply(550, "5.4.4", "Unable to route: the MX hosts are in internal networks")


@dataclass(frozen=True, slots=True)
class Host:
    """One place to connect to: the name (MX host or relay) for TLS SNI and logs, its address."""

    name: str
    address: str
    port: int
    preference: int = 0
    # The MX answer and this host's address records were DNSSEC-validated (AD bit from a
    # configured resolver): the precondition for DANE (RFC 7672 §2.2).
    is_secure: bool = False

    def __str__(self) -> str:
        """Postfix-style "mx1.example.org[192.0.2.5]:25", as in the delivery log."""
        return f"{self.name}[{self.address}]:{self.port}"


@dataclass(frozen=True, slots=True)
class Route:
    """The hosts to try for one destination, in order."""

    destination: str
    hosts: tuple[Host, ...]


class RouteError(Exception):
    """No route for a destination. `reply` is what the recipients' results carry; its class
    (4xx or 5xx) says whether the failure is temporary or permanent."""

    def __init__(self, reply: Reply, detail: str) -> None:
        super().__init__(detail)
        self.reply = reply
        self.detail = detail

    @property
    def is_permanent(self) -> bool:
        return self.reply.is_permanent


def domain_of(address: str) -> str:
    """The lower-cased domain of an address ("" when it has none)."""
    _, at, domain = address.rpartition("@")
    return domain.lower().rstrip(".") if at else ""


class Router:
    """Resolves destinations with dnspython's async resolver (or the relay) and caches them."""

    def __init__(
        self,
        cfg: DeliveryConfig,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        bad_nets: Sequence[IPNetwork] = (),
    ) -> None:
        self.cfg = cfg
        # [smarthost] bad_nets: MX hosts there are never connected to (a domain whose MX
        # points inside the organisation would make the gateway relay into it, or loop).
        self.bad_nets = tuple(bad_nets)
        self.rng = rng or random.Random()
        self.clock = clock
        self.relay = cfg.relay_host_port
        # AD bits are asked for, and believed, only for DANE and only from the operator's
        # resolvers (dnsresolver.is_trusted).
        self.dnssec = cfg.tls.dane and is_trusted(cfg.nameservers)
        self.resolver = make_async_resolver(
            cfg.nameservers, cfg.connect_timeout, dnssec=self.dnssec
        )
        self._cache: dict[str, tuple[float, Route | RouteError]] = {}

    def destination(self, address: str) -> str:
        """The key under which recipients share connections: the relay, or their domain."""
        return RELAY_KEY if self.relay is not None else domain_of(address)

    async def resolve(self, destination: str) -> Route:
        """The hosts for `destination` (a key from `destination()`); raises RouteError."""
        now = self.clock()
        cached = self._cache.get(destination)
        if cached is not None and cached[0] > now:
            if isinstance(cached[1], RouteError):
                raise cached[1]
            return self._shuffled(cached[1])
        try:
            route, ttl = await self._lookup(destination)
        except RouteError as e:
            self._cache[destination] = (now + ERROR_CACHE_TTL, e)
            raise
        self._cache[destination] = (now + ttl, route)
        return self._shuffled(route)

    def forget(self, destination: str) -> None:
        self._cache.pop(destination, None)

    def _shuffled(self, route: Route) -> Route:
        """Equal preferences in a new random order on every use (RFC 5321 §5.1), so that the
        load spreads across equal MX hosts although the route comes from the cache. A host's
        addresses stay together and in their order."""
        by_pref: dict[int, dict[str, list[Host]]] = {}
        for host in route.hosts:
            by_pref.setdefault(host.preference, {}).setdefault(host.name, []).append(host)
        hosts: list[Host] = []
        for pref in sorted(by_pref):
            names = list(by_pref[pref])
            self.rng.shuffle(names)
            for name in names:
                hosts.extend(by_pref[pref][name])
        return Route(route.destination, tuple(hosts))

    async def _lookup(self, destination: str) -> tuple[Route, float]:
        if destination == RELAY_KEY:
            assert self.relay is not None
            return await self._relay_route(*self.relay), MAX_CACHE_TTL
        if not destination or not _is_hostname(destination):
            raise RouteError(BAD_DOMAIN, f"bad destination domain {destination!r}")
        return await self._mx_route(destination)

    async def _relay_route(self, host: str, port: int) -> Route:
        """The relay is the operator's own next hop: its name goes through the system resolver
        (so /etc/hosts counts), not through delivery.nameservers."""
        if _is_ip(host):
            return Route(RELAY_KEY, (Host(host, host, port),))
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), self.cfg.connect_timeout
            )
        except (OSError, TimeoutError) as e:
            raise RouteError(DNS_TEMPFAIL, f"relay {host}: cannot resolve ({e})") from None
        addresses: list[str] = []
        for info in infos:
            address = str(info[4][0])
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise RouteError(DNS_TEMPFAIL, f"relay {host}: no address")
        return Route(RELAY_KEY, tuple(Host(host, a, port) for a in addresses))

    async def _mx_route(self, domain: str) -> tuple[Route, float]:
        port = self.cfg.smtp_port
        ttls: list[float] = []
        try:
            answer = await self.resolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN:
            raise RouteError(DOMAIN_NOT_FOUND, f"{domain}: NXDOMAIN") from None
        except dns.resolver.NoAnswer:
            answer = None
        except dns.exception.DNSException as e:
            raise RouteError(DNS_TEMPFAIL, f"{domain} MX: {dns_error(e)}") from None

        groups: list[tuple[int, list[str]]] = []
        is_implicit = answer is None
        mx_secure = self.dnssec and answer is not None and is_authenticated(answer)
        if answer is None:
            # RFC 5321 §5.1: no MX records: the domain itself is the host, preference 0.
            groups = [(0, [domain])]
        else:
            ttls.append(float(answer.rrset.ttl) if answer.rrset is not None else MAX_CACHE_TTL)
            records = [
                (int(r.preference), r.exchange.to_text().lower().rstrip(".")) for r in answer
            ]
            targets = [(pref, name) for pref, name in records if name]
            if not targets:
                # RFC 7505 §3: a single MX record with the root as exchange: no mail accepted.
                raise RouteError(NULL_MX, f"{domain}: null MX")
            by_pref: dict[int, list[str]] = {}
            for pref, name in targets:
                by_pref.setdefault(pref, []).append(name)
            groups = sorted(by_pref.items())

        ordered: list[tuple[int, str]] = []
        for pref, names in groups:
            ordered.extend((pref, name) for name in dict.fromkeys(names))
        ordered = ordered[:MAX_MX_HOSTS]

        lookups = await asyncio.gather(*(self._addresses(name) for _, name in ordered))
        hosts: list[Host] = []
        temporary: list[str] = []
        refused: list[str] = []
        for (pref, name), (addresses, ttl, error, secure) in zip(ordered, lookups, strict=True):
            if error:
                temporary.append(error)
            if ttl is not None:
                ttls.append(ttl)
            for a in addresses:
                if self.is_refused(a):
                    refused.append(f"{name}[{a}]")
                else:
                    hosts.append(Host(name, a, port, pref, is_secure=mx_secure and secure))
        if refused:
            log.warning("route %s: MX addresses inside smarthost.bad_nets skipped: %s",
                        domain, ", ".join(refused))  # fmt: skip
        if not hosts and refused and not temporary:
            raise RouteError(
                MX_IN_BAD_NETS, f"{domain}: MX hosts in bad_nets: {', '.join(refused)}"
            )
        if not hosts:
            if temporary:
                raise RouteError(DNS_TEMPFAIL, "; ".join(temporary))
            if is_implicit:
                raise RouteError(NO_ADDRESS, f"{domain}: no MX and no A/AAAA records")
            raise RouteError(MX_HOSTS_UNRESOLVED, f"{domain}: no MX host has an address")
        ttl = max(MIN_CACHE_TTL, min([MAX_CACHE_TTL, *ttls]))
        return Route(domain, tuple(hosts)), ttl

    def is_refused(self, address: str) -> bool:
        """An address inside smarthost.bad_nets: never connected to."""
        return in_networks(address, self.bad_nets)

    async def _addresses(self, name: str) -> tuple[list[str], float | None, str, bool]:
        """A then AAAA addresses of `name` (IPv4 first, as most MTAs prefer for reputation),
        the smallest TTL, a temporary error text ("" if none), and whether every answer that
        gave addresses was DNSSEC-validated."""
        if _is_ip(name):
            return [name], None, "", False
        results = await asyncio.gather(
            self._query(name, "A"), self._query(name, "AAAA"), return_exceptions=False
        )
        addresses: list[str] = []
        ttl: float | None = None
        errors: list[str] = []
        secure = True
        for found, found_ttl, error, found_secure in results:
            addresses.extend(found)
            if found and not found_secure:
                secure = False
            if found_ttl is not None:
                ttl = found_ttl if ttl is None else min(ttl, found_ttl)
            if error:
                errors.append(error)
        # A temporary failure of one family does not matter when the other answered.
        text = "" if addresses else "; ".join(errors)
        return addresses, ttl, text, secure and bool(addresses)

    async def _query(self, name: str, rdtype: str) -> tuple[list[str], float | None, str, bool]:
        try:
            answer = await self.resolver.resolve(name, rdtype)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return [], None, "", False
        except dns.exception.DNSException as e:
            return [], None, f"{name} {rdtype}: {dns_error(e)}", False
        ttl = float(answer.rrset.ttl) if answer.rrset is not None else None
        return [r.to_text() for r in answer], ttl, "", self.dnssec and is_authenticated(answer)


def dns_error(e: dns.exception.DNSException) -> str:
    if isinstance(e, dns.resolver.NoNameservers):
        return "SERVFAIL"
    if isinstance(e, dns.exception.Timeout):
        return "timeout"
    return type(e).__name__


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_hostname(name: str) -> bool:
    """A domain name (identity.normalize, the one domain rule: U-labels are fine, dnspython
    applies IDNA). Address literals (user@[192.0.2.1]) are refused here: mail to them is not
    routed by DNS and is a classic abuse path."""
    try:
        normalize(name)
    except BadDomain:
        return False
    return True

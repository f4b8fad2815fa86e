"""Forward-confirmed reverse DNS (FCrDNS) of a client address, for `[smarthost] require_rdns`.

Owns: the question "is this client registered in DNS?": a PTR query for the address (RFC 1035
§3.5, RFC 3596 §2.5 for ip6.arpa), then an A (IPv4) or AAAA (IPv6) query for each PTR name; the
address is confirmed when one of those names resolves back to it. The answer is cached per
address, and concurrent checks of one address share one lookup. Lookups use
`[delivery] nameservers` (the system resolver when that is empty) and are bounded by
`[smarthost] rdns_timeout` in total. Must not: decide which reply a client gets (the session
maps the result to RDNS_REQUIRED / RDNS_TEMPFAIL), or block the event loop.

Outcomes:
  confirmed  a PTR name resolves back to the address; `name` is that host name.
  failed     a positive reason: no PTR (NXDOMAIN or NODATA), or no PTR name resolves back
             (NXDOMAIN or NODATA, or other addresses only). Cached for `ttl`.
  temporary  the DNS could not answer (timeout, SERVFAIL, no nameserver). Not cached: the
             next connection asks again (STYLE.md §1.4: temporary is the default).

A PTR name is used only when it is a plain LDH host name (RFC 1123 §2.1), lower-cased and without
the final dot, so what reaches the Received: header can never carry CR, LF, parentheses or
escapes: DNS names may hold any octet, and dnspython renders those as `\\DDD`.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.reversename

from mailgate.dnsname import domain_name
from mailgate.dnsresolver import make_async_resolver
from mailgate.netaddr import IPAddress, parse_address

log = logging.getLogger(__name__)

MAX_PTR_NAMES = 10  # forward-check at most this many PTR names (a PTR set can be huge)
DEFAULT_TTL = 300.0  # seconds a confirmed or failed answer is remembered
DEFAULT_MAX_ENTRIES = 10_000  # cached addresses; the least recently used go first

_NEGATIVE = (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer)


@dataclass(frozen=True, slots=True)
class RdnsResult:
    """The outcome of one check.

    status: "confirmed", "failed" or "temporary" (see the module docstring).
    name:   the confirmed host name ("" unless confirmed): LDH, lower case, no final dot.
    detail: why, for the log only ("no PTR", "mail.example.org has no A record", "timeout").
    """

    status: Literal["confirmed", "failed", "temporary"]
    name: str = ""
    detail: str = ""


def host_name(text: str) -> str | None:
    """`text` as a lower-case LDH host name without the final dot, or None when it is not one."""
    return domain_name(text)


class ReverseDns:
    """FCrDNS checks of one server process, with a bounded cache.

    nameservers: (ip, port) pairs ([delivery] nameservers); empty means the system resolver.
    timeout:     seconds for one whole check (PTR and forward queries together).
    ttl:         seconds a confirmed or failed result is cached.
    now:         the cache's clock (injectable for tests).
    """

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]],
        *,
        timeout: float,
        ttl: float = DEFAULT_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nameservers = tuple(nameservers)
        self._timeout = timeout
        self._ttl = ttl
        self._max_entries = max_entries
        self._now = now
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._cache: OrderedDict[IPAddress, tuple[float, RdnsResult]] = OrderedDict()
        self._inflight: dict[IPAddress, asyncio.Task[RdnsResult]] = {}

    async def check(self, ip: str) -> RdnsResult:
        """Check `ip`; never raises for DNS trouble (that is a "temporary" result)."""
        addr = parse_address(ip)
        if addr is None:
            return RdnsResult("failed", detail=f"not an IP address: {ip!r}")
        cached = self._cache.get(addr)
        if cached is not None:
            if cached[0] > self._now():
                self._cache.move_to_end(addr)
                return cached[1]
            del self._cache[addr]
        task = self._inflight.get(addr)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._bounded(addr))
            self._inflight[addr] = task
            task.add_done_callback(functools.partial(self._finished, addr))
        # shield: one session giving up (it was cancelled) must not cancel the others' lookup.
        return await asyncio.shield(task)

    def _finished(self, addr: IPAddress, task: asyncio.Task[RdnsResult]) -> None:
        self._inflight.pop(addr, None)
        if task.cancelled() or task.exception() is not None:
            return
        result = task.result()
        if result.status == "temporary":
            return
        self._cache[addr] = (self._now() + self._ttl, result)
        self._cache.move_to_end(addr)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)

    async def _bounded(self, addr: IPAddress) -> RdnsResult:
        try:
            return await asyncio.wait_for(self._lookup(addr), self._timeout)
        except TimeoutError:
            return RdnsResult("temporary", detail=f"no answer within {self._timeout:g}s")
        except Exception as e:  # a resolver bug must not become a refusal, nor kill the session
            log.exception("rdns lookup of %s failed", addr)
            return RdnsResult("temporary", detail=f"lookup error: {type(e).__name__}")

    async def _lookup(self, addr: IPAddress) -> RdnsResult:
        resolver = self._get_resolver()
        if resolver is None:
            return RdnsResult("temporary", detail="no resolver configuration")
        try:
            answer = await resolver.resolve(dns.reversename.from_address(str(addr)), "PTR")
        except _NEGATIVE:
            return RdnsResult("failed", detail="no PTR record")
        except dns.exception.DNSException as e:
            return RdnsResult("temporary", detail=f"PTR: {type(e).__name__}")
        names = [n for n in (host_name(r.to_text()) for r in answer) if n is not None]
        if not names:
            return RdnsResult("failed", detail="no PTR record names a valid host")
        rdtype = "A" if addr.version == 4 else "AAAA"
        temporary = ""
        for name in names[:MAX_PTR_NAMES]:
            try:
                forward = await resolver.resolve(name + ".", rdtype)
            except _NEGATIVE:
                continue
            except dns.exception.DNSException as e:
                temporary = f"{name} {rdtype}: {type(e).__name__}"
                continue
            if any(ipaddress.ip_address(r.to_text()) == addr for r in forward):
                return RdnsResult("confirmed", name=name)
        if temporary:
            return RdnsResult("temporary", detail=temporary)
        return RdnsResult("failed", detail=f"no {rdtype} of {', '.join(names[:3])} is {addr}")

    def _get_resolver(self) -> dns.asyncresolver.Resolver | None:
        if self._resolver is None:
            try:
                resolver = make_async_resolver(self._nameservers, self._timeout)
            except dns.exception.DNSException as e:  # no /etc/resolv.conf, say
                log.error("rdns: cannot configure a resolver: %s", e)
                return None
            self._resolver = resolver
        return self._resolver

"""Sender and relay policy: who may send as whom, and who may relay.

Owns: the decisions of INTERFACE.md's sender policy (the seed: any address may be used, but the
authenticated sender is always identified) and the smart host's relay rule. Must not: do I/O other
than directory look-ups, or build reply text (it raises `Rejected` with a named reply).

The rules, for an authenticated session:
  - MAIL FROM:<>                      -> left alone (bounces, RFC 5321 §4.5.5)
  - MAIL FROM an address it may use   -> unchanged
  - MAIL FROM in a managed/default domain it may not use -> 553 5.7.1
  - MAIL FROM a foreign address       -> the envelope sender becomes the primary address
  - From: an address it may use       -> unchanged
  - From: managed/default, not its own -> 553 5.7.1
  - From: foreign                     -> add `Sender: <primary address>`
The smart host has no logins: it relays for `smarthost.networks` only (550 5.7.1 at RCPT).

Destinations (every service): a recipient whose domain is an address literal (RFC 5321 §4.1.3,
`user@[10.1.2.3]`, `user@[IPv6:::1]`) inside `smarthost.bad_nets` is refused with 550 5.7.1
(RELAY_TO_INTERNAL_DENIED): the gateway must not be made to deliver into the internal networks,
or to itself, which would loop. Domain names whose MX hosts resolve into those networks are a
delivery-time question (the engine resolves them); that check is not made here.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mailgate import replies
from mailgate.directory import Directory, Domain
from mailgate.errors import Rejected

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_DOMAIN_TTL = 5.0  # seconds a domain look-up is remembered


@dataclass(frozen=True, slots=True)
class Sender:
    """Who is sending, as policy sees it."""

    service: str  # "submission", "submissions", "smarthost"
    client_ip: str
    login: str | None = None
    # Addresses the authentication backend vouches for, primary first (auth.Identity): LDAP's
    # mail and alias attributes, Dovecot's user. Empty for the directory backend, whose users
    # table has the primary address. Grants (`address add`) count on top, for every backend.
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FromDecision:
    """The outcome of checking the From: header.

    sender_header: the address for an added `Sender:` header, or None.
    sign_domain:   the From: domain to DKIM-sign for, or None when signing is not permitted.
    """

    sender_header: str | None
    sign_domain: str | None


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


class Policy:
    """Policy decisions for one server; cheap and synchronous (directory look-ups only)."""

    def __init__(
        self,
        directory: Directory,
        *,
        smarthost_networks: Sequence[IPNetwork],
        internal_networks: Sequence[IPNetwork] = (),
    ) -> None:
        self._directory = directory
        self._networks = tuple(smarthost_networks)
        self._internal = tuple(internal_networks)
        self._domains: dict[str, tuple[float, Domain | None]] = {}

    # --- relay -------------------------------------------------------------------
    def may_relay(self, client_ip: str) -> bool:
        """The smart host relays for clients inside smarthost.networks only."""
        return _in_networks(client_ip, self._networks)

    def check_rcpt(self, sender: Sender, address: str) -> None:
        """Raise Rejected(RELAY_DENIED) for an unauthenticated client outside the networks, and
        Rejected(RELAY_TO_INTERNAL_DENIED) for a literal inside `internal_networks`."""
        if sender.login is None and not self.may_relay(sender.client_ip):
            raise Rejected(
                replies.RELAY_DENIED,
                f"client {sender.client_ip} is not in smarthost.networks (rcpt {address})",
            )
        check_destination(address, self._internal)

    # --- envelope sender -------------------------------------------------------
    def check_sender(self, sender: Sender, address: str) -> str:
        """The envelope sender to use for MAIL FROM `address`; raise 553 5.7.1 when forbidden."""
        if sender.login is None or address == "":
            return address
        primary = self._primary(sender)
        if self._may_send_as(sender, address):
            return address
        if self._directory.is_managed(domain_of(address)):
            raise Rejected(
                replies.SENDER_NOT_ALLOWED,
                f"login {sender.login} may not use {address} (managed domain)",
            )
        # A foreign address: allowed, but bounces must reach the person who really sent it.
        return primary

    # --- header sender ----------------------------------------------------------
    def check_from(self, sender: Sender, from_addresses: Iterable[str]) -> FromDecision:
        """Decide on the From: header's addresses (RFC 5322 §3.6.2)."""
        addresses = [a for a in from_addresses if "@" in a]
        if sender.login is None:
            return FromDecision(None, self._smarthost_sign_domain(sender, addresses))
        primary = self._primary(sender)
        foreign = False
        for address in addresses:
            if self._may_send_as(sender, address):
                continue
            if self._directory.is_managed(domain_of(address)):
                raise Rejected(
                    replies.SENDER_NOT_ALLOWED,
                    f"login {sender.login} may not use From: {address} (managed domain)",
                )
            foreign = True
        if foreign or not addresses:
            return FromDecision(primary, None)
        # Sign for the first author's domain (RFC 6376 §3.5: d= should align with From:).
        return FromDecision(None, domain_of(addresses[0]))

    def _smarthost_sign_domain(self, sender: Sender, addresses: Sequence[str]) -> str | None:
        """Smart-host mail is signed only when the From: domain lists the client's network."""
        if len(addresses) != 1:
            return None
        domain = self._domain(domain_of(addresses[0]))
        if domain is None or not domain.smarthost_networks:
            return None
        nets = [ipaddress.ip_network(n, strict=False) for n in domain.smarthost_networks]
        return domain.name if _in_networks(sender.client_ip, nets) else None

    def _domain(self, name: str) -> Domain | None:
        """get_domain with a few seconds of memory: the smart host asks it for every message,
        and `mailgate domain` changes reach a running server within _DOMAIN_TTL anyway."""
        now = time.monotonic()
        hit = self._domains.get(name)
        if hit is not None and hit[0] > now:
            return hit[1]
        domain = self._directory.get_domain(name)
        if len(self._domains) > 10_000:
            self._domains.clear()
        self._domains[name] = (now + _DOMAIN_TTL, domain)
        return domain

    def _primary(self, sender: Sender) -> str:
        """The primary address: the backend's first address, else the directory user's."""
        assert sender.login is not None
        if sender.addresses:
            return sender.addresses[0]
        user = self._directory.get_user(sender.login)
        if user is None:  # removed while the session was open
            raise Rejected(replies.AUTH_REQUIRED, f"login {sender.login} no longer exists")
        return user.address

    def _may_send_as(self, sender: Sender, address: str) -> bool:
        """One of the backend's addresses (ASCII case ignored, as the directory does), the
        directory user's primary address, or a grant."""
        assert sender.login is not None
        folded = address.lower()
        if any(folded == mine.lower() for mine in sender.addresses):
            return True
        return self._directory.may_send_as(sender.login, address)


def literal_address(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address of a recipient whose domain is an address literal, else None.

    RFC 5321 §4.1.3: `[192.0.2.1]` or `[IPv6:2001:db8::1]` (the tag is case-insensitive); an
    IPv4-mapped IPv6 literal counts as its IPv4 address, so `[IPv6:::ffff:10.0.0.1]` cannot be
    used to slip past an IPv4 network. Anything else (a name, a general literal) gives None.
    """
    domain = address.rpartition("@")[2]
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    try:
        if inner[:5].upper() == "IPV6:":
            v6 = ipaddress.IPv6Address(inner[5:])
            return v6.ipv4_mapped or v6
        return ipaddress.IPv4Address(inner)
    except ValueError:
        return None


def check_destination(address: str, bad_nets: Sequence[IPNetwork]) -> None:
    """Raise Rejected(RELAY_TO_INTERNAL_DENIED) when `address` is an address literal inside
    `bad_nets` ([smarthost] bad_nets). Names are not resolved here (no I/O in policy)."""
    if not bad_nets:
        return
    ip = literal_address(address)
    if ip is not None and any(ip in net for net in bad_nets):
        raise Rejected(
            replies.RELAY_TO_INTERNAL_DENIED,
            f"recipient {address} is an address literal inside smarthost.bad_nets",
        )


def _in_networks(ip: str, networks: Sequence[IPNetwork]) -> bool:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)

"""Sender and relay policy: who may send as whom, and who may relay.

Owns: the decisions of INTERFACE.md's sender policy (the seed: any address may be used, but the
authenticated sender is always identified) and the smart host's relay rule. Must not: do I/O other
than directory look-ups, or build reply text (it raises `Rejected` with a named reply).

"The institution's" domains: the default domain, every managed domain, and every subdomain of
them (`hr.example.ac.uk` passes relaxed DMARC alignment as `example.ac.uk`), except the subtrees
listed in `[policy] foreign_subdomains`. Every domain is normalised (identity.normalize: UTS-46,
A-labels) before it is compared, so `bücher.example` is `xn--bcher-kva.example` and
`example。ac。uk` is `example.ac.uk`.

The rules, for an authenticated session:
  - MAIL FROM:<>                      -> left alone (bounces, RFC 5321 §4.5.5)
  - MAIL FROM an address it may use   -> unchanged
  - MAIL FROM in an institution domain it may not use -> 553 5.7.1
  - MAIL FROM a foreign address       -> the envelope sender becomes the primary address
  - every address of From:, Sender:, Resent-From:, Resent-Sender: (and every address written
    in their display names), as read by message/authors.py:
      one it may use                  -> fine
      institution, not its own        -> 553 5.7.1 (From: SENDER_NOT_ALLOWED, else naming the field)
      foreign                         -> our `Sender: <primary address>` replaces the client's
  - no From: at all                   -> `Sender: <primary address>`
  - DKIM signing for the first From: domain only when no address is foreign.
The smart host has no logins: it relays for `smarthost.networks` only (550 5.7.1 at RCPT), and
its mail is signed only when the single From: address is in a domain that lists the client's
network and every other author address is too.

Destinations (every service): a recipient whose domain is an address literal (RFC 5321 §4.1.3,
`user@[10.1.2.3]`, `user@[IPv6:::1]`) inside `smarthost.bad_nets` is refused with 550 5.7.1
(RELAY_TO_INTERNAL_DENIED): the gateway must not be made to deliver into the internal networks,
or to itself, which would loop. Domain names whose MX hosts resolve into those networks are a
delivery-time question (the engine resolves them); that check is not made here.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from mailgate import replies
from mailgate.directory import Directory
from mailgate.errors import Rejected
from mailgate.identity import AuthorField, BadDomain, Mailbox, normalize, parents
from mailgate.netaddr import IPAddress, IPNetwork, address_literal, in_networks, unmapped
from mailgate.values import Domain

log = logging.getLogger(__name__)
_DOMAIN_TTL = 5.0  # seconds a domain look-up is remembered
T = TypeVar("T")


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
    """The outcome of checking the author fields.

    sender_header: the address for an added `Sender:` header (replacing any the client sent),
                   or None.
    sign_domain:   the From: domain to DKIM-sign for, or None when signing is not permitted.
    """

    sender_header: str | None
    sign_domain: str | None


class Policy:
    """Policy decisions for one server; cheap and synchronous (directory look-ups only)."""

    def __init__(
        self,
        directory: Directory,
        *,
        smarthost_networks: Sequence[IPNetwork],
        internal_networks: Sequence[IPNetwork] = (),
        foreign_subdomains: Iterable[str] = (),
    ) -> None:
        self._directory = directory
        self._networks = tuple(smarthost_networks)
        self._internal = tuple(internal_networks)
        self._foreign = frozenset(normalize(d) for d in foreign_subdomains)
        self._domains: dict[str, tuple[float, Domain | None]] = {}
        self._managed: dict[str, tuple[float, bool]] = {}

    # --- relay -------------------------------------------------------------------
    def may_relay(self, client_ip: str) -> bool:
        """The smart host relays for clients inside smarthost.networks only."""
        return in_networks(client_ip, self._networks)

    def check_rcpt(self, sender: Sender, address: str) -> None:
        """Raise Rejected(RELAY_DENIED) for an unauthenticated client outside the networks, and
        Rejected(RELAY_TO_INTERNAL_DENIED) for a literal inside `internal_networks`."""
        if sender.login is None and not self.may_relay(sender.client_ip):
            raise Rejected(
                replies.RELAY_DENIED,
                f"client {sender.client_ip} is not in smarthost.networks (rcpt {address})",
            )
        check_destination(address, self._internal)

    # --- whose domains -------------------------------------------------------------
    def is_institution(self, domain: str) -> bool:
        """True when normalised `domain` is the default or a managed domain, or a subdomain of
        one that is not inside a `foreign_subdomains` subtree (the nearest listed name wins)."""
        for name in parents(domain):
            if self._is_managed(name):
                return True
            if name in self._foreign:
                return False
        return False

    # --- envelope sender -------------------------------------------------------
    def check_sender(self, sender: Sender, address: str) -> str:
        """The envelope sender to use for MAIL FROM `address`; raise 553 5.7.1 when forbidden."""
        if sender.login is None or address == "":
            return address
        primary = self._primary(sender)
        mailbox = _mailbox(address)
        if mailbox is None:
            # An address literal, or a name no receiver reads as one of ours: foreign. It never
            # leaves: the envelope sender becomes the primary address below.
            return primary
        if self._may_send_as(sender, mailbox):
            return address
        if self.is_institution(mailbox.domain):
            raise Rejected(
                replies.SENDER_NOT_ALLOWED,
                f"login {sender.login} may not use {address} (institution domain)",
            )
        # A foreign address: allowed, but bounces must reach the person who really sent it.
        return primary

    # --- header sender ----------------------------------------------------------
    def check_identity(self, sender: Sender, authors: Sequence[AuthorField] | None) -> FromDecision:
        """Decide on the author fields (RFC 5322 §3.6.2, §3.6.6) read by message/authors.py.

        `authors` is None when a smart-host message's author fields could not be read strictly
        (an authenticated session's message is refused before it gets here): not signed.
        """
        if sender.login is None:
            if authors is None:
                return FromDecision(None, None)
            return FromDecision(None, self._smarthost_sign_domain(sender, authors))
        primary = self._primary(sender)
        foreign = False
        for field in authors or ():
            for mailbox in field.mailboxes + field.shown:
                if self._may_send_as(sender, mailbox):
                    continue
                if self.is_institution(mailbox.domain):
                    reply = (replies.SENDER_NOT_ALLOWED if field.name == "From"
                             else replies.identity_not_allowed(field.name))  # fmt: skip
                    raise Rejected(
                        reply, f"login {sender.login} may not use {field.name}: {mailbox.address}"
                    )
                foreign = True
        froms = [f for f in authors or () if f.name == "From"]
        if foreign or not froms:
            return FromDecision(primary, None)
        # Sign for the first author's domain (RFC 6376 §3.5: d= should align with From:).
        return FromDecision(None, froms[0].mailboxes[0].domain)

    def _smarthost_sign_domain(self, sender: Sender, authors: Sequence[AuthorField]) -> str | None:
        """Smart-host mail is signed only when the one From: address is in a domain that lists
        the client's network, and so is every other address of the author fields."""
        froms = [m for f in authors if f.name == "From" for m in f.mailboxes]
        if len(froms) != 1:
            return None
        every = [m for f in authors for m in f.mailboxes + f.shown]
        for mailbox in every:
            domain = self._domain(mailbox.domain)
            if domain is None or not may_sign_smarthost(domain, sender.client_ip):
                return None
        return froms[0].domain

    def _is_managed(self, name: str) -> bool:
        """is_managed, remembered: every author address asks it once per label."""
        return _remembered(self._managed, name, self._directory.is_managed)

    def _domain(self, name: str) -> Domain | None:
        """get_domain, remembered: the smart host asks it for every message."""
        return _remembered(self._domains, name, self._directory.get_domain)

    def _primary(self, sender: Sender) -> str:
        """The primary address: the backend's first address, else the directory user's."""
        assert sender.login is not None
        if sender.addresses:
            return sender.addresses[0]
        user = self._directory.get_user(sender.login)
        if user is None:  # removed while the session was open
            raise Rejected(replies.AUTH_REQUIRED, f"login {sender.login} no longer exists")
        return user.address

    def _may_send_as(self, sender: Sender, mailbox: Mailbox) -> bool:
        """One of the backend's addresses (compared normalised, local part ignoring ASCII
        case, as the directory does), the directory user's primary address, or a grant."""
        assert sender.login is not None
        folded = mailbox.address.lower()
        for mine in sender.addresses:
            own = _mailbox(mine)
            if own is not None and own.address.lower() == folded:
                return True
        return self._directory.may_send_as(sender.login, mailbox.address)


def _mailbox(address: str) -> Mailbox | None:
    """`local@domain` with its domain normalised, or None when the domain is no host name."""
    local, _, domain = address.rpartition("@")
    try:
        return Mailbox(local, normalize(domain))
    except BadDomain:
        return None


def _remembered(cache: dict[str, tuple[float, T]], key: str, fetch: Callable[[str], T]) -> T:
    """`fetch(key)` remembered for _DOMAIN_TTL seconds: `mailgate domain` changes reach a
    running server within that time anyway, and a message asks the same names several times."""
    now = time.monotonic()
    hit = cache.get(key)
    if hit is not None and hit[0] > now:
        return hit[1]
    value = fetch(key)
    if len(cache) > 10_000:
        cache.clear()
    cache[key] = (now + _DOMAIN_TTL, value)
    return value


def may_sign_smarthost(domain: Domain, client_ip: str) -> bool:
    """True when `client_ip` (a smart-host client) lies in one of the domain's networks.

    A relayed message is signed only when the domain lists the client's network: a host on
    the campus network is not thereby allowed to send as every managed domain.
    """
    networks: list[IPNetwork] = []
    for text in domain.smarthost_networks:
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            log.warning("domain=%s ignoring bad smart-host network %r", domain.name, text)
    return in_networks(client_ip, networks)


def literal_address(address: str) -> IPAddress | None:
    """The IP address of a recipient whose domain is an address literal, else None.

    RFC 5321 §4.1.3: `[192.0.2.1]` or `[IPv6:2001:db8::1]` (the tag is case-insensitive); an
    IPv4-mapped IPv6 literal counts as its IPv4 address, so `[IPv6:::ffff:10.0.0.1]` cannot be
    used to slip past an IPv4 network. Anything else (a name, a general literal) gives None.
    """
    ip = address_literal(address.rpartition("@")[2])
    return None if ip is None else unmapped(ip)


def check_destination(
    address: str, bad_nets: Sequence[IPNetwork], *, allow_special: bool = True
) -> None:
    """Raise Rejected(RELAY_TO_INTERNAL_DENIED) when `address` is an address literal inside
    `bad_nets` ([smarthost] bad_nets) or, unless `allow_special` ([delivery]
    allow_internal_literals), in a network that is not globally reachable: loopback, private,
    link-local, shared, reserved, documentation, multicast (issue #11: delivery into internal
    networks, loops through our own smart host). Names are not resolved here (no I/O)."""
    if not bad_nets and allow_special:
        return
    ip = literal_address(address)
    if ip is not None and not allow_special and is_special_address(ip):
        raise Rejected(
            replies.RELAY_TO_INTERNAL_DENIED,
            f"recipient {address} is an address literal of a special-purpose network",
        )
    if ip is not None and in_networks(ip, bad_nets):
        raise Rejected(
            replies.RELAY_TO_INTERNAL_DENIED,
            f"recipient {address} is an address literal inside smarthost.bad_nets",
        )


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the IPv4 address in the last 32 bits


def is_special_address(ip: IPAddress) -> bool:
    """Not a globally reachable unicast address (RFC 6890 registries, as `ipaddress` knows them),
    looking through IPv6 forms that carry an IPv4 address (mapped, 6to4, NAT64)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and is_special_address(embedded):
            return True
    return not ip.is_global or ip.is_multicast

"""What a mail program needs to send through mailgate, for one address: the model behind every
set-up format (autoconfig, autodiscover, .mobileconfig) and the settings page.

Owns: reading an address from a request (`parse_address`), the outgoing servers (465 with
implicit TLS, RFC 8314; 587 with STARTTLS, RFC 6409 + 3207) from the configured listeners,
and the username rule (`[web] username`). Must not: look the address up in the directory: a
public page must not tell a stranger which addresses have accounts or who owns them, so the
username comes from the address and the configuration alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from mailgate.config import Config
from mailgate.identity import BadDomain, normalize

# RFC 5321 §4.1.2 dot-atom local parts only (no quoted strings): what people type.
_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
MAX_ADDRESS = 254  # RFC 5321 §4.5.3.1.3 path less its angle brackets


class BadAddress(ValueError):
    """The text is not an address of the form local@domain; str() says why, for the person."""


@dataclass(frozen=True, slots=True)
class Address:
    local: str
    domain: str  # A-labels, lower case (identity.normalize)

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


def parse_address(text: str) -> Address:
    text = text.strip()
    if not text:
        raise BadAddress("no email address given")
    if len(text) > MAX_ADDRESS:
        raise BadAddress("that is too long for an email address")
    local, sep, domain = text.rpartition("@")
    if not sep or not _LOCAL_PART.fullmatch(local) or len(local) > 64:
        raise BadAddress("that is not an email address of the form name@example.org")
    try:
        return Address(local, normalize(domain))
    except BadDomain:
        raise BadAddress("the part after the @ is not a domain name") from None


Security = Literal["SSL", "STARTTLS"]


@dataclass(frozen=True, slots=True)
class Server:
    """One server to configure. security: SSL (TLS from the first byte) or STARTTLS."""

    hostname: str
    port: int
    security: Security


@dataclass(frozen=True, slots=True)
class MailSettings:
    """Everything every format says, for one address in a managed domain."""

    address: Address
    username: str
    outgoing: tuple[Server, ...]  # 465 (SSL) first: RFC 8314 §3.3 prefers implicit TLS
    incoming: Server | None  # [web] imap, when the operator named one
    username_is_local_part: bool


def settings_for(cfg: Config, address: Address) -> MailSettings:
    outgoing = []
    if cfg.submissions.listen:
        outgoing.append(Server(cfg.hostname, cfg.submissions.listen[0].port, "SSL"))
    if cfg.submission.listen:
        outgoing.append(Server(cfg.hostname, cfg.submission.listen[0].port, "STARTTLS"))
    rule = username_rule(cfg)
    return MailSettings(
        address=address,
        username=address.local if rule == "localpart" else str(address),
        outgoing=tuple(outgoing),
        incoming=_imap(cfg.web.imap),
        username_is_local_part=rule == "localpart",
    )


def username_rule(cfg: Config) -> Literal["localpart", "address"]:
    """`[web] username`, with "auto" decided from the authentication backend."""
    if cfg.web.username == "address":
        return "address"
    if cfg.web.username == "localpart":
        return "localpart"
    ldap = cfg.auth.ldap
    if cfg.auth.backend == "ldap":
        # (mail={login}): people log in with their address.
        looked_up = re.findall(r"\(([A-Za-z][A-Za-z0-9-]*)=\{login\}\)", ldap.filter)
        attributes = {a.lower() for a in (ldap.address_attribute, *ldap.alias_attributes)}
        if any(a.lower() in attributes for a in looked_up):
            return "address"
    # directory and Dovecot: the primary address is LOGIN@default_domain (INTERFACE part 2).
    return "localpart"


def _imap(text: str) -> Server | None:
    if not text:
        return None
    host, _, port = text.rpartition(":")
    number = int(port)
    # 143 is IMAP with STARTTLS (RFC 3501 §6.2.1); anything else is taken as implicit TLS
    # (993, RFC 8314 §3.3).
    return Server(host.strip("[]"), number, "STARTTLS" if number == 143 else "SSL")

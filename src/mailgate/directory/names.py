"""Names the directory stores: addresses, domains, logins, passwords, DKIM selectors.

Owns: validating and normalising what an operator or a client hands to the directory, the same
for every backend. Must not: do I/O.

Addresses (RFC 5321 §4.1.2, RFC 5322 §3.4.1): `local@domain` with a dot-atom local part
(UTF-8 allowed, RFC 6531) and an LDH domain (RFC 1035 §2.3.1, A-labels for IDNs). The domain
is stored lower-case, the local part as given; every comparison ignores ASCII case.
"""

from __future__ import annotations

import string

from mailgate.dnsname import dkim_selector, domain_name
from mailgate.errors import DirectoryError

MAX_LOGIN_LENGTH = 255
MAX_PASSWORD_LENGTH = 1024
DKIM_ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
WILDCARD_LOCAL = "*"  # "*@domain": every address of the domain (a domain-wide grant)

# RFC 5322 §3.2.3 atext; "." separates atoms (dot-atom).
_ATEXT = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~")


def normalize_domain(name: str, *, min_labels: int = 1) -> str:
    """`name` lower-cased without a trailing dot; DirectoryError unless it is an LDH domain
    (dnsname.domain_name, the one rule) of at least `min_labels` labels."""
    domain = domain_name(name, min_labels=min_labels)
    if domain is None:
        ascii_text = isinstance(name, str) and name.isascii()
        hint = "" if ascii_text else " (use the xn-- form for IDNs)"
        raise DirectoryError(f"{name!r} is not a valid domain name{hint}")
    return domain


def normalize_address(address: str, *, wildcard: bool = False) -> str:
    """`local@domain` with the domain lower-cased; DirectoryError naming the address if invalid.

    With `wildcard`, "*@domain" (a domain-wide grant) is accepted as well.
    """
    if not isinstance(address, str) or "@" not in address:
        raise DirectoryError(f"invalid address {address!r}: expected local@domain")
    local, _, domain_text = address.rpartition("@")
    try:
        domain = normalize_domain(domain_text)
    except DirectoryError:
        raise DirectoryError(f"invalid address {address!r}: bad domain") from None
    if local == WILDCARD_LOCAL:
        if not wildcard:
            raise DirectoryError(f"invalid address {address!r}: '*@' is only for grants")
        return f"{WILDCARD_LOCAL}@{domain}"
    # RFC 5321 §4.5.3.1.1: 64 octets per local part. Quoted local parts are not supported:
    # nobody needs one as a sender address, and they make comparisons ambiguous.
    if not local or len(local.encode("utf-8")) > 64:
        raise DirectoryError(f"invalid address {address!r}: bad local part")
    if any(not atom for atom in local.split(".")):
        raise DirectoryError(f"invalid address {address!r}: bad local part")
    for ch in local:
        if ch != "." and ch not in _ATEXT and not (ord(ch) > 127 and ch.isprintable()):
            raise DirectoryError(f"invalid address {address!r}: bad local part")
    return f"{local}@{domain}"


def check_login(login: str) -> str:
    """`login` itself if acceptable as an AUTH identity: printable, no spaces, not too long."""
    if (
        not isinstance(login, str)
        or not login
        or len(login) > MAX_LOGIN_LENGTH
        or any(ch.isspace() or not ch.isprintable() for ch in login)
    ):
        raise DirectoryError(
            f"invalid login {login!r}: expected 1-255 printable characters, no spaces"
        )
    return login


def check_password(password: str) -> str:
    """`password` itself if it can be stored: not empty, one line, no NUL (SASL PLAIN, RFC 4616)."""
    if not password:
        raise DirectoryError("the password is empty")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise DirectoryError(f"the password is longer than {MAX_PASSWORD_LENGTH} characters")
    if any(ch in "\0\r\n" for ch in password):
        raise DirectoryError("the password contains a NUL or line break")
    return password


def check_selector(selector: str) -> str:
    """`selector` lower-cased; DirectoryError unless it is a DKIM selector (dnsname.dkim_selector,
    the one rule)."""
    canonical = dkim_selector(selector)
    if canonical is None:
        raise DirectoryError(f"invalid DKIM selector {selector!r}")
    return canonical

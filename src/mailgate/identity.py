"""Who a message says it is from: the values the sender policy decides on, and the domain rule.

Owns: `Mailbox` and `AuthorField` (built by message/authors.py from the header section, read
by policy.py), and turning a domain as written by a client (MAIL FROM, a From: header) into
the one form every "is this ours / managed / granted" question uses: lower-case A-labels, no
trailing dot, after UTS-46 mapping (Unicode TR 46 §4, via the `idna` package). Full stops
other than U+002E (U+3002, U+FF0E, U+FF61), fullwidth letters, upper case and ignorable
characters map to what a receiver that displays or resolves the name makes of them, and a
U-label spelling of an A-label domain compares equal to it.

Must not: import anything from mailgate but dnsname (the LDH rule and lengths; policy and
message share this module), do I/O, or accept a
name two receivers could read as two different domains: a name with a deviation character
(RFC 5892 §2.6: ß, ς, ZWJ, ZWNJ) is mapped differently by transitional (IDNA 2003) and
non-transitional processing, so it is refused as ambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import idna

from mailgate.dnsname import domain_name

# Unicode TR 46 §4.2 deviations: mapped (or deleted) by transitional processing only.
_DEVIATIONS = frozenset("\u00df\u03c2\u200c\u200d")


class BadDomain(ValueError):
    """The text is not a domain name every receiver reads the same way; str() says why."""


def normalize(domain: str) -> str:
    """`domain` as lower-case A-labels (e.g. "xn--bcher-kva.example"), or BadDomain.

    Refused: empty labels (so a trailing dot, written as "." or as a Unicode full stop),
    characters outside UTS-46 with STD3 rules (RFC 1123 host names: letters, digits, hyphen),
    "xn--" labels that are not valid Punycode for a valid U-label, deviation characters (see the
    module docstring), and names over 253 octets. An all-ASCII label is an LDH label as it
    stands: IDNA 2008's rule against "--" in the third and fourth positions is for registries,
    and host names such as "r3---sn-abc.example" exist.
    """
    if not domain:
        raise BadDomain("empty domain")
    if any(ch in _DEVIATIONS for ch in domain):
        raise BadDomain("domain with a character that IDNA 2003 and 2008 map differently")
    try:
        mapped = idna.uts46_remap(domain, std3_rules=True, transitional=False)
    except (idna.IDNAError, UnicodeError, ValueError) as e:
        raise BadDomain(f"not a valid domain name ({e})") from None
    labels = mapped.split(".")
    if any(not label for label in labels):
        raise BadDomain("domain with an empty label (a trailing or doubled dot)")
    ascii_labels = [_a_label(label) for label in labels]
    for label in ascii_labels:
        # The one LDH rule (dnsname); `mapped` is lower case already.
        if domain_name(label) != label:
            raise BadDomain(f"not a valid domain name (label {label[:63]!r})")
    ascii_form = ".".join(ascii_labels)
    if domain_name(ascii_form) is None:  # every label is valid: only the length is left
        raise BadDomain("domain longer than 253 octets")
    return ascii_form


def _a_label(label: str) -> str:
    """An A-label for a U-label or an "xn--" label (validated by `idna`); an ASCII label as it
    stands (the caller checks it)."""
    if label.isascii() and not label.startswith("xn--"):
        return label
    try:
        return idna.alabel(label).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError) as e:
        raise BadDomain(f"not a valid domain name ({e})") from None


def is_canonical(written: str, normalized: str) -> bool:
    """True when `written` is `normalized` (its A-label form) or that form's U-labels, ignoring
    case: what every receiver displays the same way, whether or not it applies UTS-46."""
    folded = written.lower()
    if folded == normalized:
        return True
    try:
        return folded == idna.decode(normalized)
    except (idna.IDNAError, UnicodeError, ValueError):
        return False


def parents(domain: str) -> list[str]:
    """`domain` and every parent domain of it, most specific first ("a.b.c" -> a.b.c, b.c, c)."""
    labels = domain.split(".")
    return [".".join(labels[i:]) for i in range(len(labels))]


@dataclass(frozen=True, slots=True)
class Mailbox:
    """One address a receiver could show as (part of) the author or sender of a message.

    local:  the local part as written (a dot-atom; RFC 6532 UTF-8 allowed).
    domain: the domain, normalised (`normalize`).
    """

    local: str
    domain: str

    @property
    def address(self) -> str:
        return f"{self.local}@{self.domain}"


@dataclass(frozen=True, slots=True)
class AuthorField:
    """One From:, Sender:, Resent-From: or Resent-Sender: field, read strictly.

    name:      the field's name in its usual spelling ("From", "Resent-Sender").
    mailboxes: its addresses, in order.
    shown:     addresses written inside its display names or comments ("ceo@example.org"
               <x@y.test>): many mail programs show only the display name, so these must
               pass the same policy as the addresses themselves.
    """

    name: str
    mailboxes: tuple[Mailbox, ...]
    shown: tuple[Mailbox, ...] = ()

"""Domain names: the one validator of the names mailgate stores, compares and writes to logs.

Owns: the rule for an LDH domain name (RFC 1035 §2.3.1: letters, digits, hyphens; IDNs in
their A-label form, RFC 5890) and its canonical form (lower case, no final dot), with the
lengths of RFC 1035 §2.3.4 (63 octets per label, 253 in text form), and the DKIM selector,
which is a sub-domain of the same labels (RFC 6376 §3.1). A managed mail domain
needs two labels or more (MANAGED_DOMAIN_LABELS): its name becomes a folder under dkim/, where
a single label (dkim/removed/) is reserved. Must not: import anything else from mailgate, or
resolve names.
"""

from __future__ import annotations

import re

MANAGED_DOMAIN_LABELS = 2
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_MAX_NAME = 253


def domain_name(text: str, *, min_labels: int = 1) -> str | None:
    """`text` in canonical form when it is an LDH domain name of at least `min_labels`
    labels, else None."""
    if not isinstance(text, str) or not text.isascii():
        return None
    name = text.lower().removesuffix(".")
    labels = name.split(".")
    if not name or len(name) > _MAX_NAME or len(labels) < min_labels:
        return None
    return name if all(_LABEL.match(label) for label in labels) else None


def dkim_selector(text: str) -> str | None:
    """`text` in canonical form (lower case) when it is a DKIM selector, else None.

    RFC 6376 §3.1: selector = sub-domain *( "." sub-domain ), so a dotted selector
    ("2026.mail") is valid; no final dot (the selector is followed by "._domainkey.").
    """
    if not isinstance(text, str) or text.endswith("."):
        return None
    return domain_name(text)

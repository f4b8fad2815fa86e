"""Value types that several stages hand to each other, kept apart from every stage.

Owns: `Domain` and `DkimKey` (a managed domain and its DKIM keys as the directory stores them;
read by message/ to sign and by policy.py to decide), and `Trace` with its `with_keyword` (the
facts of a session that a Received: field states; built by receive/, written by
message/stamp.py). Frozen dataclasses, documented field by field. Must not: import anything
from mailgate, do I/O, or hold behaviour beyond what a value says about itself: each stage
imports these without importing the stage that makes them (docs/ARCHITECTURE.md, "Imports").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class DkimKey:
    selector: str
    algorithm: str  # "rsa-sha256" or "ed25519-sha256"
    key_path: Path  # private key file, 0600
    public_key_b64: str  # the p= value of the DNS record
    active: bool = True  # signing with it; rotated-out keys stay published until removed


@dataclass(frozen=True, slots=True)
class Domain:
    name: str
    keys: tuple[DkimKey, ...] = ()
    smarthost_networks: tuple[str, ...] = ()  # networks whose smart-host mail may be signed


@dataclass(frozen=True, slots=True)
class Trace:
    """Facts about the session for the Received: header.

    with_keyword: RFC 3848: ESMTP, ESMTPS (TLS), ESMTPA (AUTH), ESMTPSA (both), SMTP (HELO).
    """

    client_helo: str
    client_ip: str
    client_name: str  # reverse DNS name or "" when unknown
    service: str
    port: int
    with_keyword: str
    tls: str  # "TLSv1.3:TLS_AES_256_GCM_SHA384" or ""
    login: str | None
    mechanism: str | None


def with_keyword(*, extended: bool, tls: bool, authenticated: bool) -> str:
    """RFC 3848 §1 / RFC 5321 §4.4 protocol keyword."""
    if not extended:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")

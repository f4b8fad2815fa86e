"""DANE for SMTP: TLSA look-ups for MX hosts and matching the certificates they present.

Owns: the `_PORT._tcp.HOST` TLSA look-up with its DNSSEC status, which records are usable,
and whether a presented chain matches them. Must not: open connections, decide what a failed
match means for delivery (tlspolicy.py and the engine do), or validate DNSSEC itself (the
AD bit of the configured resolvers is trusted: dnsresolver.py).

RFC 7672 §2.2: TLSA records are looked up only for an MX host whose MX and address records
were validated (`Host.is_secure`); a secure answer with usable records makes authenticated TLS
mandatory; a secure answer whose records are all unusable still makes TLS mandatory but
without authentication (§2.2, last paragraph); an insecure or empty answer means no DANE; a
failed look-up (SERVFAIL, timeout) for a secure host means that host cannot be used now
(§2.2.1: a possible downgrade attack, never "no DANE").
RFC 7672 §3.1: usable are DANE-TA(2) and DANE-EE(3); PKIX-TA(0) and PKIX-EE(1) are not
used for SMTP. RFC 6698 §2.1: selector 0 full certificate, 1 SubjectPublicKeyInfo; matching
type 0 exact, 1 SHA-256, 2 SHA-512. DANE-EE: no name or validity checks (RFC 7672 §3.1.1).
DANE-TA: the TA must be in the presented chain, the chain must be signed up to it, and the
leaf must be valid now and carry the MX host name (RFC 7672 §3.1.2, §3.2.2).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mailgate.deliver.certs import load_chain, name_matches, names_of
from mailgate.dnsresolver import is_authenticated

DANE_TA = 2
DANE_EE = 3


@dataclass(frozen=True, slots=True)
class Tlsa:
    """One TLSA record (RFC 6698 §2.1)."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def is_usable(self) -> bool:
        return (
            self.usage in (DANE_TA, DANE_EE)
            and self.selector in (0, 1)
            and self.mtype
            in (
                0,
                1,
                2,
            )
        )

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()[:16]}"


TlsaStatus = Literal["none", "usable", "unusable", "error"]


@dataclass(frozen=True, slots=True)
class TlsaResult:
    """What the TLSA look-up for one host found.

    status: "none" (insecure, missing or not looked up: no DANE), "usable" (authenticated TLS
            with `records` is mandatory), "unusable" (TLS mandatory, no authentication),
            "error" (the host must not be used now; `detail` says why).
    """

    status: TlsaStatus
    records: tuple[Tlsa, ...] = ()
    detail: str = ""


async def lookup(resolver: dns.asyncresolver.Resolver, host: str, port: int) -> TlsaResult:
    """The TLSA records of `host` (an MX host whose own records were validated)."""
    qname = f"_{port}._tcp.{host.rstrip('.')}."
    try:
        answer = await resolver.resolve(qname, "TLSA")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        # Secure denial or insecure: either way no TLSA records, no DANE (RFC 7672 §2.2).
        return TlsaResult("none")
    except dns.exception.DNSException as e:
        return TlsaResult("error", detail=f"TLSA {qname}: {type(e).__name__}")
    if not is_authenticated(answer):
        return TlsaResult("none", detail="TLSA answer not validated")
    records = tuple(
        Tlsa(int(r.usage), int(r.selector), int(r.mtype), bytes(r.cert))
        for r in answer
        if r.rdtype == dns.rdatatype.TLSA
    )
    usable = tuple(r for r in records if r.is_usable)
    if usable:
        return TlsaResult("usable", usable)
    return TlsaResult("unusable" if records else "none", records)


def match(
    records: Sequence[Tlsa], chain: Sequence[bytes], names: Sequence[str], now: datetime
) -> str:
    """ "" when the presented `chain` (DER, leaf first) matches one of `records`, else why
    not (one line)."""
    try:
        certs = load_chain(chain)
    except ValueError as e:
        return str(e)
    leaf = certs[0]
    why = "no TLSA record matches the certificate chain"
    for record in records:
        if record.usage == DANE_EE and _matches(record, leaf):
            return ""
    for record in records:
        if record.usage != DANE_TA:
            continue
        for depth, cert in enumerate(certs):
            if depth == 0 or not _matches(record, cert):
                continue
            problem = _chain_problem(certs[: depth + 1], names, now)
            if not problem:
                return ""
            why = f"DANE-TA matched but {problem}"
    return why


def _matches(record: Tlsa, cert: x509.Certificate) -> bool:
    if record.selector == 0:
        content = cert.public_bytes(Encoding.DER)
    else:
        content = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if record.mtype == 1:
        content = hashlib.sha256(content).digest()
    elif record.mtype == 2:
        content = hashlib.sha512(content).digest()
    return content == record.data


def _chain_problem(path: Sequence[x509.Certificate], names: Sequence[str], now: datetime) -> str:
    """Why leaf -> ... -> trust anchor (the last of `path`) is not acceptable, "" if it is."""
    for child, parent in itertools.pairwise(path):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            return "the chain is not signed up to the trust anchor"
    leaf = path[0]
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        return "the certificate is not valid now (expired or not yet valid)"
    if not any(name_matches(pattern, name) for pattern in names_of(leaf) for name in names):
        return f"the certificate is not for {', '.join(names)}"
    return ""

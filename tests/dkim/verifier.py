"""Helpers for verifying mailgate's DKIM signatures with dkimpy's own verifier.

dkimpy verifies Ed25519 signatures through PyNaCl, which is not among mailgate's dependencies.
When PyNaCl is missing, `ensure_ed25519_verifier` gives dkimpy a stand-in module exposing the
four names it uses (``nacl.signing.VerifyKey``, ``nacl.encoding.Base64Encoder`` and two
exception types) on top of `cryptography`'s Ed25519 verification. Everything else -- parsing the
signature and the key record, canonicalisation, header selection, hashing -- is dkimpy's code.
With PyNaCl installed, dkimpy uses it and the stand-in is never installed.

Also: a dkimpy ``dnsfunc`` that asks a DNS server over loopback with dnspython, and a loader
that puts the records of a zone-file text (what `mailgate domain dns` prints) into the test
DNS server of tests/support/dnsserver.py.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.zone
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

import dkim
from mailgate.dnsresolver import make_resolver
from tests.support.dnsserver import DnsServer


class _NaclValueError(ValueError):
    pass


class _BadSignatureError(Exception):
    pass


class _Base64Encoder:
    @staticmethod
    def decode(data: bytes) -> bytes:
        return base64.b64decode(data)


class _VerifyKey:
    """PyNaCl's VerifyKey as dkimpy calls it: VerifyKey(p, encoder=...).verify(msg, sig)."""

    def __init__(self, key: bytes, encoder: Any = None) -> None:
        raw = encoder.decode(key) if encoder is not None else key
        try:
            self._key = Ed25519PublicKey.from_public_bytes(raw)
        except ValueError as e:
            raise _NaclValueError(str(e)) from None

    def verify(self, message: bytes, signature: bytes) -> bytes:
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            raise _BadSignatureError("Signature was forged or corrupt") from None
        return message


def ensure_ed25519_verifier() -> None:
    """Let dkimpy verify Ed25519 signatures (see the module docstring)."""
    if hasattr(dkim, "nacl"):
        return  # dkimpy imported the real PyNaCl
    dkim.nacl = SimpleNamespace(
        signing=SimpleNamespace(VerifyKey=_VerifyKey),
        encoding=SimpleNamespace(Base64Encoder=_Base64Encoder),
        exceptions=SimpleNamespace(
            ValueError=_NaclValueError, BadSignatureError=_BadSignatureError
        ),
    )


def dnsfunc_for(server: DnsServer) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc``: the first TXT record at a name, its strings joined, over DNS."""
    resolver = make_resolver([(server.host, server.port)], 5.0)

    def get_txt(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode("ascii") if isinstance(name, bytes) else name
        try:
            answer = resolver.resolve(text, "TXT", lifetime=timeout, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        for rdata in answer:
            return b"".join(rdata.strings)
        return None

    return get_txt


def serve_zone(server: DnsServer, origin: str, zone_text: str) -> set[str]:
    """Publish every record of `zone_text` (relative to `origin`) on `server`; return the
    owner names published.

    dnspython's zone parser reads the text exactly as a name server would, so this also checks
    that the printed records are valid zone-file syntax.
    """
    zone = dns.zone.from_text(zone_text, origin=origin, relativize=False, check_origin=False)
    names: set[str] = set()
    for name, node in zone.nodes.items():
        for rdataset in node.rdatasets:
            values = [rdata.to_text() for rdata in rdataset]
            # DnsServer's public helpers quote one TXT string each; a DKIM key needs several.
            server._set(name.to_text(), dns.rdatatype.to_text(rdataset.rdtype), values)
            names.add(name.to_text())
    return names


def verify_all(message: bytes, dnsfunc: Callable[..., bytes | None]) -> list[bool]:
    """dkimpy's verdict for every DKIM-Signature of `message`, topmost first.

    As dkim.verify() does for the first signature, a DKIMException (body hash mismatch, key
    record unusable) is a failed verification.
    """
    ensure_ed25519_verifier()
    headers = dkim.DKIM(message).headers
    count = sum(1 for name, _ in headers if name.lower() == b"dkim-signature")
    return [_verify_one(message, i, dnsfunc) for i in range(count)]


def _verify_one(message: bytes, idx: int, dnsfunc: Callable[..., bytes | None]) -> bool:
    try:
        return bool(dkim.DKIM(message).verify(idx=idx, dnsfunc=dnsfunc))
    except dkim.DKIMException:
        return False

"""Certificates of the MX hosts we deliver to: the chain a server presented, its names, and
PKIX verification against the configured trust anchors.

Owns: reading the peer's certificate chain from a TLS session, the trust store
(`delivery.tls.ca_file` or the system's bundle, loaded once), verifying a chain for a host
name, and the name matching that MTA-STS `mx` patterns and DANE-TA name checks share.
Must not: open connections, decide which policy applies (tlspolicy.py) or look up DNS.

Why the verification is done here rather than by OpenSSL during the handshake: a handshake
that fails verification tells us neither the names on the certificate nor, for DANE, which
record failed; the operator needs both in the log ("the peer certificate's name on failure").
So the handshake accepts any certificate and this module judges the chain afterwards, before a
single command of the transaction is sent. The chain is verified with `cryptography`'s
RFC 5280 verifier (`cryptography.x509.verification`), with RFC 6125 §6.4.3 host-name rules.

RFCs: 5280 (path validation), 6125 §6.4.3 (one wildcard, in the left-most label), 8461 §4.1
(MTA-STS `mx` patterns: the same left-most-label wildcard).
"""

from __future__ import annotations

import logging
import re
import ssl
import warnings
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.x509 import DNSName
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

log = logging.getLogger(__name__)

MAX_NAMES_SHOWN = 3  # names of a peer certificate written to a log line
_ENCODING_DER = 2  # _ssl.ENCODING_DER: the format argument of the 3.10-3.12 Certificate objects


def peer_chain(ssl_object: ssl.SSLObject | None) -> list[bytes]:
    """The certificates the server sent (DER, its own first), verified or not.

    TODO(python>=3.13): SSLObject.get_unverified_chain() is public from 3.13 on; until
    requires-python says so, 3.11/3.12 reach the same method (present since 3.10) on the
    wrapped C object. Without either, the leaf alone (getpeercert) is returned: DANE-EE and
    a leaf issued directly by a trust anchor still verify.
    """
    if ssl_object is None:
        return []
    method = getattr(ssl_object, "get_unverified_chain", None)
    if method is None:
        inner = getattr(ssl_object, "_sslobj", None)
        method = getattr(inner, "get_unverified_chain", None)
    if method is not None:
        try:
            chain = method() or []
        except (ssl.SSLError, ValueError):
            chain = []
        out = [c if isinstance(c, bytes) else c.public_bytes(_ENCODING_DER) for c in chain]
        if out:
            return out
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def load_chain(chain: Sequence[bytes]) -> list[x509.Certificate]:
    """Parse a presented chain (DER, leaf first); ValueError saying why it cannot be judged
    (none presented, or one malformed)."""
    if not chain:
        raise ValueError("no certificate")
    try:
        return [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError as e:
        raise ValueError(f"unparsable certificate: {e}") from None


def names_of(cert: x509.Certificate) -> list[str]:
    """The DNS names a certificate is for: its subjectAltName DNS names, else its CN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = [str(n) for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return names


def describe(chain: Sequence[bytes]) -> str:
    """The peer certificate's names for a log line ("mx.example.net,*.example.net")."""
    if not chain:
        return "none"
    try:
        names = names_of(x509.load_der_x509_certificate(chain[0]))
    except ValueError:
        return "unparsable"
    shown = ",".join(names[:MAX_NAMES_SHOWN])
    if len(names) > MAX_NAMES_SHOWN:
        shown += f",+{len(names) - MAX_NAMES_SHOWN}"
    return shown or "no-name"


def name_matches(pattern: str, name: str) -> bool:
    """RFC 6125 §6.4.3 / RFC 8461 §4.1: equal (case-insensitive, trailing dot ignored), or
    "*.rest" matching exactly one more label on the left of "rest"."""
    pattern = pattern.lower().rstrip(".")
    name = name.lower().rstrip(".")
    if not pattern or not name:
        return False
    if pattern.startswith("*."):
        first, dot, rest = name.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:] and "*" not in first
    return pattern == name


class TrustStore:
    """Trust anchors for MX certificates: `ca_file` or the system's bundle, loaded on first use
    (a delivery engine that never meets a policy never reads them)."""

    def __init__(self, ca_file: Path | None) -> None:
        self.ca_file = ca_file
        self._store: Store | None = None
        self._is_loaded = False

    def store(self) -> Store | None:
        """The anchors; None when there are none (nothing can verify)."""
        if not self._is_loaded:
            anchors = self._load()
            self._store = Store(anchors) if anchors else None
            self._is_loaded = True
        return self._store

    def _load(self) -> list[x509.Certificate]:
        path = self.ca_file
        if path is None:
            paths = ssl.get_default_verify_paths()
            path = Path(paths.cafile or paths.openssl_cafile)
        try:
            data = path.read_bytes()
        except OSError as e:
            log.error("trust anchors %s cannot be read: %s", path, e)
            return []
        certs: list[x509.Certificate] = []
        marker = b"-----END CERTIFICATE-----"
        for block in data.split(marker):
            if b"-----BEGIN CERTIFICATE-----" not in block:
                continue
            try:  # one odd certificate in a system bundle must not disable all the others
                with warnings.catch_warnings():  # old roots with odd serial numbers
                    warnings.simplefilter("ignore")
                    certs.append(x509.load_pem_x509_certificate(block.strip() + b"\n" + marker))
            except ValueError:
                continue
        return certs

    def verify(self, chain: Sequence[bytes], names: Sequence[str], now: datetime) -> str:
        """ "" when `chain` verifies up to a trust anchor for one of `names` at `now`, else why
        not (one line)."""
        try:
            certs = load_chain(chain)
        except ValueError as e:
            return str(e)
        store = self.store()
        if store is None:
            return "no trust anchors (delivery.tls.ca_file or the system bundle)"
        builder = PolicyBuilder().store(store).time(now)
        why = "no name to check"
        for name in names:
            try:
                verifier = builder.build_server_verifier(DNSName(name))
                verifier.verify(certs[0], certs[1:])
            except VerificationError as e:
                why = _short(str(e))
                continue
            except ValueError as e:  # a name the verifier cannot represent
                why = _short(str(e))
                continue
            return ""
        leaf = certs[0]
        if leaf.issuer == leaf.subject and len(certs) == 1:
            return "self-signed certificate (not issued by a trusted CA)"
        return why


def _short(text: str) -> str:
    """One line of a verifier message, without its internal prefixes."""
    text = " ".join(text.split())
    text = re.sub(r"\s*\(encountered processing <Certificate.*\)$", "", text)
    return text.removeprefix("validation failed: ")

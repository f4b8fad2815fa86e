"""The TLS certificate and key files: a self-signed pair for `mailgate init`, and their check.

Owns: generating an ECDSA P-256 key and a self-signed X.509 certificate (RFC 5280) for the
submission services, writing them (key 0600), and checking that a configured certificate and
key load, match and are in date (`mailgate check-config`). Must not: build SSLContexts (that is
receive/tls.py) or import anything from mailgate but `errors`.

A self-signed certificate is a start, not an end: clients will warn until the operator replaces
it with one from a CA (e.g. ACME). It names the hostname, localhost, 127.0.0.1 and ::1 so that
local tests and clients pinning the certificate can verify it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mailgate.errors import ConfigError

VALIDITY = dt.timedelta(days=3650)  # ten years: a self-signed certificate is pinned, not renewed
_BACKDATE = dt.timedelta(hours=1)  # tolerate clients whose clocks run a little slow
# An ECDSA server key only signs the TLS handshake (RFC 5280 §4.2.1.3).
_SERVER_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def generate_self_signed(
    hostname: str, *, now: dt.datetime | None = None, validity: dt.timedelta = VALIDITY
) -> tuple[bytes, bytes]:
    """A new (certificate PEM, private key PEM) pair for `hostname`.

    The key is ECDSA P-256 (unencrypted PKCS#8); the certificate is an end-entity certificate
    for TLS servers, subjectAltName = hostname, localhost, 127.0.0.1, ::1 (RFC 6125 §6.4: SAN,
    not the CN, is what clients match).
    """
    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    # dict.fromkeys: no duplicate name when the hostname is localhost itself.
    names: list[x509.GeneralName] = [
        x509.DNSName(n) for n in dict.fromkeys([hostname, "localhost"])
    ]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "::1")]
    san = x509.SubjectAlternativeName(names)
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + validity)
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_SERVER_KEY_USAGE, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem


def write_self_signed(cert_path: Path, key_path: Path, hostname: str) -> None:
    """Write a new pair. Refuses (FileExistsError) to overwrite either file.

    The key is created 0600 from the start (never world-readable, not even briefly); folders
    that are missing are created 0700.
    """
    cert_pem, key_pem = generate_self_signed(hostname)
    for path in (cert_path, key_path):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_new(key_path, key_pem, 0o600)
    try:
        _write_new(cert_path, cert_pem, 0o644)
    except BaseException:
        key_path.unlink()  # ours, made a moment ago: do not leave half a pair behind
        raise


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def check_pair(cert_path: Path, key_path: Path, *, now: dt.datetime | None = None) -> None:
    """Raise ConfigError naming tls.cert or tls.key unless the pair loads, matches and is in date.

    The certificate file may hold a chain: the first certificate is the server's.
    """
    now = now or dt.datetime.now(dt.UTC)
    try:
        certs = x509.load_pem_x509_certificates(cert_path.read_bytes())
    except OSError as e:
        raise ConfigError(f"tls.cert: cannot read {cert_path}: {e.strerror}") from None
    except ValueError:
        raise ConfigError(f"tls.cert: {cert_path} holds no PEM certificate") from None
    cert = certs[0]
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as e:
        raise ConfigError(f"tls.key: cannot read {key_path}: {e.strerror}") from None
    except TypeError:
        raise ConfigError(f"tls.key: {key_path} is encrypted; give an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"tls.key: {key_path} holds no PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise ConfigError(f"tls.key: {key_path} does not match the certificate {cert_path}")
    if now > cert.not_valid_after_utc:
        expired = cert.not_valid_after_utc.strftime("%Y-%m-%d")
        raise ConfigError(f"tls.cert: {cert_path} expired on {expired}")
    if now < cert.not_valid_before_utc:
        start = cert.not_valid_before_utc.strftime("%Y-%m-%d %H:%M UTC")
        raise ConfigError(f"tls.cert: {cert_path} is not valid before {start}")

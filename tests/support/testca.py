"""A throwaway certificate authority for tests: a CA and server certificates it signs.

Used where a test needs a peer whose certificate *verifies* (slapd with StartTLS, an HTTPS
JWKS endpoint, MX hosts and MTA-STS servers), and a second CA that must not be trusted.
`server_cert()` and `server_context()` also make the certificates that must *not* verify
(for the wrong name, expired, self-signed), and `tlsa()` the DANE record data (RFC 6698 §2.1)
that matches them.

    ca = TestCA(tmp_path / "ca")
    ctx = ca.server_context("mx.dest.test")                 # valid, chain leaf + CA
    ctx = ca.server_context("mx.dest.test", kind="expired")
    tlsa = ca.tlsa("mx.dest.test", usage=3, selector=1, mtype=1)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Kind = Literal["valid", "wrong-name", "expired", "self-signed"]
WRONG_NAME = "wrong.example"


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


class TestCA:
    __test__ = False  # not a pytest class

    def __init__(self, folder: Path, name: str = "mailgate test CA") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = folder / "ca.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self._issued: dict[tuple[tuple[str, ...], str], tuple[x509.Certificate, Path, Path]] = {}

    def issue(self, name: str = "localhost") -> Issued:
        """A server certificate for `name`, localhost and 127.0.0.1, with its key (0600)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        names: list[x509.GeneralName] = [
            x509.DNSName(n) for n in dict.fromkeys([name, "localhost"])
        ]
        names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        cert_path = self.folder / f"{name}.pem"
        key_path = self.folder / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.touch(mode=0o600)
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return Issued(cert_path, key_path)

    def server_cert(self, *names: str, kind: Kind = "valid") -> tuple[x509.Certificate, Path, Path]:
        """A certificate for `names` (the chain file holds leaf then CA), and its files."""
        key_id = (names, kind)
        if key_id in self._issued:
            return self._issued[key_id]
        key = ec.generate_private_key(ec.SECP256R1())
        subject_names = [WRONG_NAME] if kind == "wrong-name" else list(names)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_names[0])])
        now = dt.datetime.now(dt.UTC)
        if kind == "expired":
            start, end = now - dt.timedelta(days=60), now - dt.timedelta(days=1)
        else:
            start, end = now - dt.timedelta(days=1), now + dt.timedelta(days=90)
        self_signed = kind == "self-signed"
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject if self_signed else self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in subject_names]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        )
        if not self_signed:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        cert = builder.sign(key if self_signed else self._key, hashes.SHA256())
        stem = f"{'_'.join(names)}-{kind}"
        chain_path = self.folder / f"{stem}.pem"
        key_path = self.folder / f"{stem}.key"
        chain = cert.public_bytes(serialization.Encoding.PEM)
        if not self_signed:
            chain += self.cert.public_bytes(serialization.Encoding.PEM)
        chain_path.write_bytes(chain)
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self._issued[key_id] = (cert, chain_path, key_path)
        return self._issued[key_id]

    def server_context(self, *names: str, kind: Kind = "valid") -> ssl.SSLContext:
        """A server SSLContext presenting a certificate of `kind` for `names`."""
        _, chain_path, key_path = self.server_cert(*names, kind=kind)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(chain_path, key_path)
        return ctx

    def tlsa(
        self, *names: str, kind: Kind = "valid", usage: int = 3, selector: int = 1, mtype: int = 1
    ) -> tuple[int, int, int, str]:
        """The TLSA record (usage, selector, mtype, hex) matching the leaf issued for `names`
        (usage 3) or this CA (usage 2)."""
        cert = self.cert if usage == 2 else self.server_cert(*names, kind=kind)[0]
        if selector == 0:
            content = cert.public_bytes(serialization.Encoding.DER)
        else:
            content = cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        if mtype == 1:
            content = hashlib.sha256(content).digest()
        elif mtype == 2:
            content = hashlib.sha512(content).digest()
        return usage, selector, mtype, content.hex()

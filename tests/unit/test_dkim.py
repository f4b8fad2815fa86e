"""Unit tests of message.dkim: the Signer and the smart-host network test.

No sockets: signatures are checked with dkimpy's verifier, whose key lookup is a dict of the
TXT records that message.dkimkeys would publish. The loopback-DNS versions are in tests/dkim/.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from mailgate.message import dkimkeys
from mailgate.message.dkim import (
    SIGNED_HEADERS,
    Signer,
    SigningError,
    signed_header_names,
)
from mailgate.message.dkimkeys import ALGORITHM_ED25519, ALGORITHM_RSA
from mailgate.values import DkimKey, Domain
from tests.dkim.verifier import verify_all

MESSAGE = (
    b"From: Bursar <bursar@college.example.ac.uk>\r\n"
    b"To: alice@example.net\r\n"
    b"Subject: Invoice 42\r\n"
    b"Date: Sat, 28 Nov 2026 12:00:00 +0000\r\n"
    b"Message-ID: <42@college.example.ac.uk>\r\n"
    b"\r\n"
    b"Please find the invoice below.\r\n"
)


class Domains:
    """The one directory question signing asks: get_domain."""

    def __init__(self, *domains: Domain) -> None:
        self.domains = {d.name: d for d in domains}

    def get_domain(self, name: str) -> Domain | None:
        return self.domains.get(name)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DkimKey]:
    base = tmp_path_factory.mktemp("data")
    return {
        "rsa": dkimkeys.generate_key(base, "college.example.ac.uk", "mg20261128", ALGORITHM_RSA),
        "ed": dkimkeys.generate_key(
            base, "college.example.ac.uk", "mg20261128-ed", ALGORITHM_ED25519
        ),
        "rsa2": dkimkeys.generate_key(base, "college.example.ac.uk", "mg20261129", ALGORITHM_RSA),
    }


def published(domain: str, *keys: DkimKey) -> Callable[..., bytes | None]:
    records = {
        f"{k.selector}._domainkey.{domain}.".encode(): dkimkeys.dkim_txt_value(k).encode()
        for k in keys
    }

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return records.get(name)

    return dnsfunc


def tag(field: bytes, name: bytes) -> bytes:
    """The value of tag `name` in one DKIM-Signature field, whitespace removed."""
    value = field.split(b":", 1)[1]
    for part in value.split(b";"):
        key, _, val = part.partition(b"=")
        if key.strip() == name:
            return b"".join(val.split())
    raise KeyError(name)


def fields(signature: bytes) -> list[bytes]:
    """Split what sign() returned into its DKIM-Signature fields."""
    out = [b"DKIM-Signature:" + f for f in signature.split(b"DKIM-Signature:")[1:]]
    assert b"".join(out) == signature
    return out


def test_rsa_signature_verifies_and_has_the_promised_tags(keys: dict[str, DkimKey]) -> None:
    domain = Domain("college.example.ac.uk", (keys["rsa"],))
    signature = Signer(Domains(domain)).sign(MESSAGE, "college.example.ac.uk")
    assert signature.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
    assert signature.endswith(b"\r\n")
    assert all(len(line) <= 78 for line in signature.split(b"\r\n"))  # RFC 5322 §2.1.1
    (field,) = fields(signature)
    assert tag(field, b"d") == b"college.example.ac.uk"
    assert tag(field, b"s") == b"mg20261128"
    assert verify_all(signature + MESSAGE, published(domain.name, keys["rsa"])) == [True]


def test_rsa_and_ed25519_sign_twice_rsa_first(keys: dict[str, DkimKey]) -> None:
    domain = Domain("college.example.ac.uk", (keys["ed"], keys["rsa"]))
    signature = Signer(Domains(domain)).sign(MESSAGE, "college.example.ac.uk")
    first, second = fields(signature)
    assert tag(first, b"a") == b"rsa-sha256"
    assert tag(second, b"a") == b"ed25519-sha256"
    assert tag(second, b"s") == b"mg20261128-ed"
    dnsfunc = published(domain.name, keys["rsa"], keys["ed"])
    assert verify_all(signature + MESSAGE, dnsfunc) == [True, True]


def test_h_tag_lists_each_present_field_and_every_name_once_more(keys: dict[str, DkimKey]) -> None:
    domain = Domain("college.example.ac.uk", (keys["rsa"],))
    message = b"Received: from x by y; Sat, 28 Nov 2026 12:00:00 +0000\r\nX-Mailer: t\r\n" + MESSAGE
    (field,) = fields(Signer(Domains(domain)).sign(message, "college.example.ac.uk"))
    names = [n.strip() for n in tag(field, b"h").split(b":")]
    assert names == [b"from", b"to", b"subject", b"date", b"message-id"] + [
        n.encode() for n in SIGNED_HEADERS
    ]
    assert b"received" not in names and b"x-mailer" not in names  # RFC 6376 §5.4: not signed


def test_signed_header_names_counts_repeated_fields() -> None:
    present = [b"Resent-From", b"Received", b"From", b"Resent-From", b"To"]
    names = signed_header_names(present)
    assert names[:4] == [b"resent-from", b"from", b"resent-from", b"to"]
    assert names.count(b"resent-from") == 3  # two present, plus one to forbid a third
    assert names.count(b"from") == 2
    assert names.count(b"sender") == 1  # absent: its absence is signed


@pytest.mark.parametrize(
    ("added", "still_valid"),
    [
        (b"Subject: Invoice 43 (changed)\r\n", False),  # over-signed: a second Subject
        (b"From: mallory@example.net\r\n", False),
        (b"Sender: mallory@example.net\r\n", False),  # absent when signed
        (b"Reply-To: mallory@example.net\r\n", False),
        (b"Cc: mallory@example.net\r\n", False),
        (b"List-Unsubscribe: <https://evil.example/>\r\n", False),
        (b"Content-Type: text/html\r\n", False),
        (b"Resent-From: mallory@example.net\r\n", False),
        (b"Received: from relay.example.net by mx.example.net\r\n", True),  # trace: allowed
        (b"X-Spam-Score: 0.1\r\n", True),
    ],
)
def test_headers_added_downstream(
    keys: dict[str, DkimKey], added: bytes, still_valid: bool
) -> None:
    domain = Domain("college.example.ac.uk", (keys["rsa"],))
    signature = Signer(Domains(domain)).sign(MESSAGE, "college.example.ac.uk")
    dnsfunc = published(domain.name, keys["rsa"])
    assert verify_all(signature + MESSAGE, dnsfunc) == [True]
    # Added at the top, as a relay would, and at the bottom of the header, where a naive
    # verifier that reads the first instance would be fooled.
    top = signature + added + MESSAGE
    head, body = MESSAGE.split(b"\r\n\r\n", 1)
    bottom = signature + head + b"\r\n" + added + b"\r\n" + body
    assert verify_all(top, dnsfunc) == [still_valid]
    assert verify_all(bottom, dnsfunc) == [still_valid]


def test_body_change_breaks_the_signature(keys: dict[str, DkimKey]) -> None:
    domain = Domain("college.example.ac.uk", (keys["rsa"], keys["ed"]))
    signature = Signer(Domains(domain)).sign(MESSAGE, "college.example.ac.uk")
    tampered = signature + MESSAGE.replace(b"invoice", b"lnvoice")
    dnsfunc = published(domain.name, keys["rsa"], keys["ed"])
    assert verify_all(tampered, dnsfunc) == [False, False]


def test_unmanaged_domain_and_domain_without_active_key_give_nothing(
    keys: dict[str, DkimKey],
) -> None:
    retired = replace(keys["rsa"], active=False)
    signer = Signer(Domains(Domain("college.example.ac.uk", (retired,))))
    assert signer.sign(MESSAGE, "college.example.ac.uk") == b""
    assert signer.sign(MESSAGE, "example.net") == b""


def test_only_active_keys_sign(keys: dict[str, DkimKey]) -> None:
    retired = replace(keys["rsa"], active=False)
    domain = Domain("college.example.ac.uk", (retired, keys["rsa2"]))
    (field,) = fields(Signer(Domains(domain)).sign(MESSAGE, "College.Example.AC.uk"))
    assert tag(field, b"s") == b"mg20261129"


def test_missing_key_file_is_a_signing_error_naming_the_path(tmp_path: Path) -> None:
    key = DkimKey("mg1", ALGORITHM_RSA, tmp_path / "gone.key", "AAAA")
    signer = Signer(Domains(Domain("college.example.ac.uk", (key,))))
    with pytest.raises(SigningError, match=r"gone\.key: DKIM key unavailable"):
        signer.sign(MESSAGE, "college.example.ac.uk")


def test_key_of_the_wrong_type_is_refused(keys: dict[str, DkimKey]) -> None:
    mixed = replace(keys["ed"], algorithm=ALGORITHM_RSA)
    signer = Signer(Domains(Domain("college.example.ac.uk", (mixed,))))
    with pytest.raises(SigningError, match="does not match algorithm rsa-sha256"):
        signer.sign(MESSAGE, "college.example.ac.uk")


def test_keys_are_read_once_and_again_when_the_file_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = dkimkeys.generate_key(tmp_path, "example.org", "mg1", ALGORITHM_ED25519)
    signer = Signer(Domains(Domain("example.org", (key,))))
    message = MESSAGE.replace(b"college.example.ac.uk", b"example.org")
    with caplog.at_level(logging.INFO, logger="mailgate.message.dkim"):
        for _ in range(5):
            signer.sign(message, "example.org")
        loads = [r for r in caplog.records if "dkim key loaded" in r.getMessage()]
        assert len(loads) == 1
        # Replace the file in place (an operator restoring a key): the new key is used.
        other = dkimkeys.generate_key(tmp_path, "example.org", "mg2", ALGORITHM_ED25519)
        os.replace(other.key_path, key.key_path)
        signature = signer.sign(message, "example.org")
        loads = [r for r in caplog.records if "dkim key loaded" in r.getMessage()]
        assert len(loads) == 2
    # Signed with the new private key under the old selector: the new public key verifies it.
    new_public = replace(key, public_key_b64=other.public_key_b64)
    assert verify_all(signature + message, published("example.org", new_public)) == [True]
    assert verify_all(signature + message, published("example.org", key)) == [False]
    for record in caplog.records:  # never key material in the log
        assert "PRIVATE KEY" not in record.getMessage()

"""DANE matching and PKIX verification of presented chains, without a network (RFC 6698 §2.1,
RFC 7672 §3.1), with certificates from the test CA."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from mailgate.deliver import dane
from mailgate.deliver.certs import TrustStore, describe
from tests.support.testca import WRONG_NAME, Kind, TestCA

NAME = "mx.dest.test"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


def chain(ca: TestCA, kind: Kind = "valid", name: str = NAME) -> list[bytes]:
    leaf = ca.server_cert(name, kind=kind)[0].public_bytes(Encoding.DER)
    return [leaf] if kind == "self-signed" else [leaf, ca.cert.public_bytes(Encoding.DER)]


def record(ca: TestCA, *, usage: int, selector: int, mtype: int) -> dane.Tlsa:
    usage, selector, mtype, data = ca.tlsa(NAME, usage=usage, selector=selector, mtype=mtype)
    return dane.Tlsa(usage, selector, mtype, bytes.fromhex(data))


def now() -> datetime:
    return datetime.now(UTC)


@pytest.mark.parametrize(
    ("usage", "selector", "mtype"),
    [(3, 0, 0), (3, 0, 1), (3, 0, 2), (3, 1, 0), (3, 1, 1), (3, 1, 2), (2, 0, 1), (2, 1, 2)],
)
def test_every_usable_combination_matches(ca: TestCA, usage: int, selector: int,
                                          mtype: int) -> None:  # fmt: skip
    rec = record(ca, usage=usage, selector=selector, mtype=mtype)
    assert rec.is_usable
    assert dane.match([rec], chain(ca), [NAME], now()) == ""


def test_dane_ee_ignores_names_and_dates(ca: TestCA) -> None:
    # RFC 7672 §3.1.1: with DANE-EE the key is what counts.
    for kind in ("wrong-name", "expired", "self-signed"):
        rec = dane.Tlsa(*_raw(ca.tlsa(NAME, kind=kind)))
        assert dane.match([rec], chain(ca, kind), [NAME], now()) == ""


def test_mismatch(ca: TestCA) -> None:
    other = dane.Tlsa(*_raw(ca.tlsa("other.test")))
    assert dane.match([other], chain(ca), [NAME], now()) == (
        "no TLSA record matches the certificate chain"
    )
    assert dane.match([other], [], [NAME], now()) == "no certificate"


def test_dane_ta_checks_name_and_dates(ca: TestCA) -> None:
    ta = record(ca, usage=2, selector=1, mtype=1)
    assert "is not for mx.dest.test" in dane.match([ta], chain(ca, "wrong-name"), [NAME], now())
    assert "not valid now" in dane.match([ta], chain(ca, "expired"), [NAME], now())
    # A self-signed leaf never chains to the TA, which is not in its chain either.
    assert dane.match([ta], chain(ca, "self-signed"), [NAME], now()) != ""


def test_unusable_records() -> None:
    assert not dane.Tlsa(1, 0, 1, b"x").is_usable  # PKIX-EE: not for SMTP (RFC 7672 §3.1.3)
    assert not dane.Tlsa(0, 0, 1, b"x").is_usable
    assert not dane.Tlsa(3, 2, 1, b"x").is_usable
    assert not dane.Tlsa(3, 1, 3, b"x").is_usable


@pytest.mark.parametrize(
    ("kind", "why"),
    [("valid", ""), ("wrong-name", "leaf certificate has no matching subjectAltName"),
     ("expired", "cert is not valid at validation time"),
     ("self-signed", "self-signed certificate (not issued by a trusted CA)")],
)  # fmt: skip
def test_pkix(ca: TestCA, kind: Kind, why: str) -> None:
    assert TrustStore(ca.cert_path).verify(chain(ca, kind), [NAME], now()) == why


def test_pkix_with_an_unreadable_ca_file_verifies_nothing(ca: TestCA, tmp_path: Path) -> None:
    assert TrustStore(tmp_path / "missing.pem").verify(chain(ca), [NAME], now()) != ""


def test_describe_names_the_peer(ca: TestCA) -> None:
    assert describe(chain(ca)) == NAME
    assert describe(chain(ca, "wrong-name")) == WRONG_NAME
    assert describe([]) == "none"
    assert describe([b"junk"]) == "unparsable"


def _raw(t: tuple[int, int, int, str]) -> tuple[int, int, int, bytes]:
    return t[0], t[1], t[2], bytes.fromhex(t[3])

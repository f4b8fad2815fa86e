"""The incremental DKIM body hash (message.dkim.BodyHasher) against dkimpy, byte for byte.

Property tests: random bodies (biased to the bytes the canonicalisations care about: space,
tab, CR, LF) split at random places give the same hash as dkimpy's whole-body
canonicalisation, relaxed and simple; and a signature made from our chunked body hash is the
same field, byte for byte, as dkimpy's own `dkim.sign` of the whole message (RSA PKCS#1 v1.5
is deterministic), and dkimpy verifies it.
"""

from __future__ import annotations

import base64
import hashlib
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from dkim.canonicalization import CanonicalizationPolicy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dkim
from mailgate.message import dkim as mgdkim
from mailgate.message import dkimkeys
from mailgate.message.dkimkeys import ALGORITHM_RSA, load_private_key
from mailgate.message.headers import parse
from mailgate.values import DkimKey

DOMAIN = "college.example.ac.uk"
HEAD = (
    b"From: Bursar <bursar@college.example.ac.uk>\r\n"
    b"To: alice@example.net\r\n"
    b"Subject: Invoice 42\r\n"
    b"Date: Sat, 28 Nov 2026 12:00:00 +0000\r\n"
    b"\r\n"
)

bodies = st.lists(
    st.sampled_from(
        [b" ", b"\t", b"\r", b"\n", b"\r\n", b"a", b".", b"  \r\n", b"\r\n\r\n", b"x y", b"\xff"]
    ),
    max_size=60,
).map(b"".join)


# What SMTP delivers (bare CR and LF are refused in DATA): dkimpy's whole-message parser
# splits lines at a bare LF too, so only strict CRLF text compares with `dkim.sign`.
crlf_bodies = st.lists(
    st.sampled_from([b" ", b"\t", b"\r\n", b"a", b".", b"  \r\n", b"\r\n\r\n", b"x y", b"\xff"]),
    max_size=60,
).map(b"".join)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    return [*pieces, data[start:]]


def dkimpy_bh(body: bytes, c: bytes) -> bytes:
    policy = CanonicalizationPolicy.from_c_value(c)
    return base64.b64encode(hashlib.sha256(policy.canonicalize_body(body)).digest())


@settings(max_examples=600, deadline=None)
@given(body=bodies, cuts=st.lists(st.integers(0, 80), max_size=8))
def test_relaxed_body_hash_in_chunks_equals_dkimpy(body: bytes, cuts: list[int]) -> None:
    assert mgdkim.body_hash(chunked(body, cuts)) == dkimpy_bh(body, b"relaxed/relaxed")


@settings(max_examples=600, deadline=None)
@given(body=bodies, cuts=st.lists(st.integers(0, 80), max_size=8))
def test_simple_body_hash_in_chunks_equals_dkimpy(body: bytes, cuts: list[int]) -> None:
    assert mgdkim.body_hash(chunked(body, cuts), relaxed=False) == dkimpy_bh(body, b"simple/simple")


@pytest.mark.parametrize(
    ("body", "pieces"),
    [
        (b"a  \r\n", [b"a ", b" ", b"\r", b"\n"]),  # WSP run and CRLF split everywhere
        (b"a\r\n\r\n\r\n", [b"a\r", b"\n\r", b"\n", b"\r\n"]),  # trailing empty lines split
        (b"a\r\n\r\nb\r\n", [b"a\r\n\r\n", b"b\r\n"]),  # empty lines followed by text count
        (b"\r\n\r\n", [b"\r", b"\n\r\n"]),  # all empty: relaxed "", simple CRLF
        (b"", []),
        (b"abc", [b"ab", b"c"]),  # no final CRLF: one is added
        (b"a\n", [b"a", b"\n"]),  # a bare LF is text, as dkimpy reads it
    ],
)
def test_chunk_boundary_cases(body: bytes, pieces: list[bytes]) -> None:
    assert b"".join(pieces) == body
    for relaxed, c in ((True, b"relaxed/relaxed"), (False, b"simple/simple")):
        assert mgdkim.body_hash(pieces, relaxed=relaxed) == dkimpy_bh(body, c)


def test_a_long_run_of_empty_lines_is_counted_not_kept() -> None:
    body = b"text\r\n" + b"\r\n" * 300_000
    pieces = [body[i : i + 4096] for i in range(0, len(body), 4096)]
    assert mgdkim.body_hash(pieces) == dkimpy_bh(body, b"relaxed/relaxed")
    more = [*pieces, b"end\r\n"]
    assert mgdkim.body_hash(more) == dkimpy_bh(body + b"end\r\n", b"relaxed/relaxed")


def test_update_after_digest_is_refused() -> None:
    hasher = mgdkim.BodyHasher()
    hasher.digest()
    with pytest.raises(ValueError, match="after digest"):
        hasher.update(b"x")


@pytest.fixture(scope="module")
def rsa_key(tmp_path_factory: pytest.TempPathFactory) -> DkimKey:
    return dkimkeys.generate_key(tmp_path_factory.mktemp("k"), DOMAIN, "sel1", ALGORITHM_RSA)


def dnsfunc_for(key: DkimKey) -> Callable[..., bytes | None]:
    name = f"{key.selector}._domainkey.{DOMAIN}.".encode()
    value = dkimkeys.dkim_txt_value(key).encode()

    def lookup(qname: bytes, timeout: float = 5) -> bytes | None:
        return value if qname == name else None

    return lookup


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=crlf_bodies, cuts=st.lists(st.integers(0, 80), max_size=6))
def test_signature_from_chunked_body_hash_is_dkimpys_byte_for_byte(
    rsa_key: DkimKey, monkeypatch: pytest.MonkeyPatch, body: bytes, cuts: list[int]
) -> None:
    message = HEAD + body
    section = parse(message, limit=len(message))
    include = mgdkim.signed_header_names(section.names())
    monkeypatch.setattr(dkim.time, "time", lambda: 1_764_331_200.0)
    theirs = dkim.sign(message, b"sel1", DOMAIN.encode(), Path(rsa_key.key_path).read_bytes(),
                       canonicalize=(b"relaxed", b"relaxed"), include_headers=include)  # fmt: skip
    # The same tags as dkimpy's, in its order; bh= from our chunked hash of the body.
    bh = mgdkim.body_hash(chunked(body, cuts))
    tags = [(b"v", b"1"), (b"a", b"rsa-sha256"), (b"c", b"relaxed/relaxed"),
            (b"d", DOMAIN.encode()), (b"i", b"@" + DOMAIN.encode()), (b"q", b"dns/txt"),
            (b"s", b"sel1"), (b"t", b"1764331200"), (b"h", b" : ".join(include)),
            (b"bh", bh), (b"b", b"0" * 60)]  # fmt: skip
    policy = CanonicalizationPolicy.from_c_value(mgdkim.CANONICALIZATION)
    headers = policy.canonicalize_headers([(f.name.encode(), f.value) for f in section.fields])
    private = load_private_key(Path(rsa_key.key_path))
    assert isinstance(private, rsa.RSAPrivateKey)
    key = mgdkim._LoadedKey((0, 0, 0), private)
    ours = mgdkim._signature_field(tags, include, headers, policy, key)
    assert ours == theirs
    assert dkim.verify(ours + message, dnsfunc=dnsfunc_for(rsa_key))


def test_large_body_in_uneven_chunks_equals_dkimpy() -> None:
    rng = random.Random(18)
    body = bytes(rng.choice(b"ab \t\r\n.") for _ in range(200_000))
    pieces = [body[i : i + 70_001] for i in range(0, len(body), 70_001)]
    for relaxed, c in ((True, b"relaxed/relaxed"), (False, b"simple/simple")):
        assert mgdkim.body_hash(pieces, relaxed=relaxed) == dkimpy_bh(body, c)

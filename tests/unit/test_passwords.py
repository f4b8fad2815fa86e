"""directory/passwords.py: argon2id with the OWASP-minimum parameters, rehash, dummy hash."""

from __future__ import annotations

import pytest
from argon2 import PasswordHasher

from mailgate.directory import passwords

PREFIX = "$argon2id$v=19$m=19456,t=2,p=1$"


def test_hash_is_argon2id_with_the_documented_parameters() -> None:
    h = passwords.hash_password("correct horse")
    assert h.startswith(PREFIX)
    assert passwords.DUMMY_HASH.startswith(PREFIX)


def test_salts_differ() -> None:
    assert passwords.hash_password("same") != passwords.hash_password("same")


def test_verify() -> None:
    h = passwords.hash_password("correct horse")
    assert passwords.verify_password(h, "correct horse") is True
    assert passwords.verify_password(h, "correct horse ") is False
    assert passwords.verify_password(h, "Correct horse") is False
    assert passwords.verify_password(h, "") is False


def test_non_ascii_password() -> None:
    h = passwords.hash_password("pässwörd✓")
    assert passwords.verify_password(h, "pässwörd✓") is True
    assert passwords.verify_password(h, "passwords") is False


def test_a_malformed_stored_hash_refuses_instead_of_raising() -> None:
    assert passwords.verify_password("not a hash", "x") is False
    assert passwords.verify_password("", "x") is False
    assert passwords.verify_password("$argon2id$v=19$m=19456,t=2,p=1$broken", "x") is False


def test_needs_rehash() -> None:
    assert passwords.needs_rehash(passwords.hash_password("x")) is False
    weaker = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash("x")
    assert passwords.needs_rehash(weaker) is True
    assert passwords.verify_password(weaker, "x") is True  # old hashes still verify
    assert passwords.needs_rehash("garbage") is True


def test_dummy_verification_costs_as_much_as_a_real_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # The cost of an argon2 verification is set by the hash's parameters, which are in the hash
    # itself: the dummy path verifies a hash made with the current ones, so it does the same
    # work as a real verification (no clock needed to see it; bench/ has no use for one either).
    assert passwords.needs_rehash(passwords.DUMMY_HASH) is False
    verified: list[str] = []
    real = passwords.verify_password

    def spy(stored_hash: str, password: str) -> bool:
        verified.append(stored_hash)
        return real(stored_hash, password)

    monkeypatch.setattr(passwords, "verify_password", spy)
    passwords.verify_dummy("wrong")
    assert verified == [passwords.DUMMY_HASH]

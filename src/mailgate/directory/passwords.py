"""Password hashing for the directory: argon2id (RFC 9106) through argon2-cffi.

Owns: the hash parameters, hashing, verification and the rehash decision, and a dummy hash
so that checking an unknown login costs as much as checking a known one; and app passwords
(`mailgate app-password`): making one, recognising its shape, and its stored hash. Must not: store,
log or return passwords, or know where hashes are kept (that is directory/store.py).
"""

from __future__ import annotations

import hashlib
import re
import secrets

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

# The OWASP Password Storage Cheat Sheet minimum for argon2id: 19 MiB, 2 iterations, 1 lane.
# Modest on purpose: a mail server verifies many logins per second (each costs ~20 ms of one
# core and 19 MiB), and the AUTH defence limits online guessing anyway. Raise them here and
# needs_rehash() makes each account's hash follow at its next successful login.
TIME_COST = 2
MEMORY_COST_KIB = 19456
PARALLELISM = 1

_hasher = PasswordHasher(
    time_cost=TIME_COST,
    memory_cost=MEMORY_COST_KIB,
    parallelism=PARALLELISM,
    hash_len=32,
    salt_len=16,
    type=Type.ID,
)

# Verified instead of a real hash when the login does not exist, so that the time an AUTH
# takes does not tell whether a login exists. Made once, with the same parameters.
DUMMY_HASH = _hasher.hash("mailgate dummy password, never matches a stored hash")


def hash_password(password: str) -> str:
    """A new argon2id hash (PHC string format, with a random salt) of `password`."""
    return _hasher.hash(password)


def verify_password(stored_hash: str, password: str) -> bool:
    """True if `password` matches `stored_hash`; False for a mismatch or a malformed hash."""
    try:
        return _hasher.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        # VerifyMismatchError is a VerificationError. A malformed hash in the database must
        # refuse the login, not crash the session.
        return False


def verify_dummy(password: str) -> None:
    """Spend the time of one verification on the dummy hash; the result is meaningless."""
    verify_password(DUMMY_HASH, password)


def needs_rehash(stored_hash: str) -> bool:
    """True if `stored_hash` was made with other parameters than the current ones."""
    try:
        return _hasher.check_needs_rehash(stored_hash)
    except (InvalidHashError, ValueError):
        return True


# App passwords: 24 characters from 31 that are hard to confuse (no 0/o, 1/l/i), in five groups
# of four: about 99 bits, so that a single SHA-256 is enough to store them (nobody can search a
# 2**99 space offline, unlike a person's password, which is why those get argon2id). The fixed
# shape also lets AUTH skip the app-password look-up for passwords that cannot be one.
_APP_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
_APP_GROUPS, _APP_GROUP_LENGTH = 5, 4
APP_PASSWORD_SHAPE = re.compile(
    rf"[{_APP_ALPHABET}]{{{_APP_GROUP_LENGTH}}}(?:-[{_APP_ALPHABET}]{{{_APP_GROUP_LENGTH}}})"
    rf"{{{_APP_GROUPS - 1}}}"
)


def new_app_password() -> str:
    """A new random app password, e.g. "k7wq-3mzp-ax9d-rt2f-hv6n"."""
    return "-".join(
        "".join(secrets.choice(_APP_ALPHABET) for _ in range(_APP_GROUP_LENGTH))
        for _ in range(_APP_GROUPS)
    )


def is_app_password_shaped(password: str) -> bool:
    return APP_PASSWORD_SHAPE.fullmatch(password.strip().lower()) is not None


def app_password_hash(password: str) -> str:
    """What the directory stores for an app password: SHA-256 of its normalised form (hex)."""
    normalised = password.strip().lower()
    return hashlib.sha256(b"mailgate app password\0" + normalised.encode()).hexdigest()

"""DKIM signing of outgoing mail for managed domains.

Owns: producing the DKIM-Signature header field(s) for a message and a domain (`Signer`), the
choice of signed header fields.

Must not: decide *whether* a message is signed (the policy does: From: in a managed domain that
the sender may use), change the message (the caller prepends what `sign` returns, as the very
last header change before the spool), read key files per message, or log key material.

How: the header fields signed are those of `message.headers.HeaderSection`, the one parse the
policy and the scan read too (issue #11: a field the policy never examined could otherwise be
signed), so a header section the parse refuses never reaches the signer, and nothing in one
can make the signer fail (dkimpy's own parser raised on "Subject :", giving a 451 for a message
that could never succeed). dkimpy (RFC 6376) canonicalises (relaxed/relaxed, §3.4.2 and
§3.4.4), selects and hashes the header fields and folds the header, exactly as its verifier
does. The
signature itself is made by `cryptography` (OpenSSL) with keys loaded once and kept in memory:
RSA-SHA256 with blinding, and Ed25519-SHA256 (RFC 8463) without needing PyNaCl.

The body hash (bh=) is ours (`BodyHasher`): the body is fed in chunks as it is read from the
spool, so a 50 MB body is never held in memory (issue #18; dkimpy canonicalises a whole body
with regular expressions, several copies of it). It follows RFC 6376 §3.4.3 (simple) and
§3.4.4 (relaxed) exactly as dkimpy's `canonicalize_body` reads them, byte for byte, including
on text that SMTP never delivers (bare CR or LF, no final CRLF): tests/unit/test_dkim_body.py
checks that with hypothesis against dkimpy on random bodies split at random places.

Signed header fields (RFC 6376 §5.4, §5.4.1 and §8.15): the recommended set plus the MIME,
Sender, Message-ID, Resent-* and List-* fields. Every name in `SIGNED_HEADERS` is listed in h=
once more than it occurs ("over-signing"; a name that is absent is listed once), so a header
field of one of these names added anywhere downstream breaks the signature.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy

import dkim
from mailgate.errors import MailgateError
from mailgate.message import headers as header_section
from mailgate.message.dkimkeys import ALGORITHM_ED25519, ALGORITHM_RSA, load_private_key
from mailgate.message.headers import HeaderSection
from mailgate.values import Domain

log = logging.getLogger(__name__)

SIGNED_HEADERS: tuple[str, ...] = (
    # RFC 6376 §5.4.1 recommended set
    "from", "reply-to", "subject", "date", "to", "cc",
    "resent-date", "resent-from", "resent-to", "resent-cc",
    "in-reply-to", "references",
    "list-id", "list-help", "list-unsubscribe", "list-subscribe", "list-post", "list-owner",
    "list-archive",
    # also: who sent it, its identity, how to read it, and RFC 8058 one-click unsubscribe
    "sender", "message-id", "resent-sender", "resent-message-id",
    "mime-version", "content-type", "content-transfer-encoding", "content-id",
    "content-description", "content-disposition", "list-unsubscribe-post",
)  # fmt: skip

CANONICALIZATION = b"relaxed/relaxed"

_WSP_RUN = re.compile(rb"[\t ]+")
_CRLF_BLOCK = b"\r\n" * 65536  # trailing empty lines are hashed in slices of this
_SLICE = 16 * 1024  # bytes canonicalised per call


class BodyHasher:
    """The SHA-256 of a canonicalised body (RFC 6376 §3.4.3, §3.4.4, §3.7), fed in chunks.

    Memory is bounded whatever the body: a chunk is canonicalised on its own, with at most two
    bytes held back (a space or CR whose fate depends on the next byte), and a run of empty
    lines at the end is counted, not kept (§3.4.3: they are ignored, unless more text follows).
    """

    def __init__(self, relaxed: bool = True) -> None:
        self._relaxed = relaxed
        self._hash = hashlib.sha256()
        self._carry = b""  # undecided: "\r", " " or " \r" (relaxed), "\r" (simple)
        self._empty_lines = 0  # CRLFs held back at the end of what was hashed
        self._has_text = False  # something other than CRLFs was hashed
        self._done = False

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        if self._done:
            raise ValueError("BodyHasher.update() after digest()")
        view = memoryview(chunk).cast("B")
        # In slices: the regular expression holds the GIL for a whole call, and the hasher
        # runs in a thread beside the event loop (accept.py).
        for start in range(0, len(view), _SLICE):
            self._update(bytes(view[start : start + _SLICE]))

    def _update(self, chunk: bytes) -> None:
        data = self._carry + chunk
        if self._relaxed:
            # §3.4.4: runs of WSP become one SP, then WSP at the end of a line goes. In that
            # order a run before a CRLF is one SP, so one replace removes it. Most text has
            # no tab and no two spaces in a row: then there is nothing to compress.
            if b"\t" in data or b"  " in data:
                data = _WSP_RUN.sub(b" ", data)
            data = data.replace(b" \r\n", b"\r\n")
            keep = 2 if data.endswith(b" \r") else 1 if data.endswith((b" ", b"\r")) else 0
        else:
            keep = 1 if data.endswith(b"\r") else 0
        self._carry = data[len(data) - keep :] if keep else b""
        self._emit(data[: len(data) - keep] if keep else data)

    def digest(self) -> bytes:
        """The raw SHA-256 digest; the hasher takes no more input afterwards."""
        if not self._done:
            self._emit(self._carry)  # nothing follows: the held bytes stand as they are
            self._carry = b""
            self._done = True
            # The body ends with exactly one CRLF (one is added when there is none; a relaxed
            # body that is empty or all empty lines is empty, §3.4.4 rule c).
            if self._has_text or not self._relaxed:
                self._hash.update(b"\r\n")
        return self._hash.digest()

    def b64digest(self) -> bytes:
        """The bh= value."""
        return base64.b64encode(self.digest())

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        crlfs = _trailing_crlfs(data)
        if crlfs * 2 == len(data):
            self._empty_lines += crlfs
            return
        self._flush_empty_lines()
        self._hash.update(data[: len(data) - 2 * crlfs])
        self._has_text = True
        self._empty_lines = crlfs

    def _flush_empty_lines(self) -> None:
        block = len(_CRLF_BLOCK) // 2
        for _ in range(self._empty_lines // block):
            self._hash.update(_CRLF_BLOCK)
        self._hash.update(_CRLF_BLOCK[: 2 * (self._empty_lines % block)])
        self._empty_lines = 0


def _trailing_crlfs(data: bytes) -> int:
    """How many CRLF pairs `data` ends with (counted from the end, as §3.4.3 strips them)."""
    stripped = len(data.rstrip(b"\r\n"))
    tail = data[stripped:]
    if not tail or tail.endswith(b"\r"):
        return 0
    # In a run of CR and LF the pairs from the end stop at a doubled CR or LF.
    tail = tail[max(tail.rfind(b"\r\r"), tail.rfind(b"\n\n")) + 1 :]
    if tail.startswith(b"\n"):
        tail = tail[1:]
    return len(tail) // 2


def body_hash(chunks: Iterable[bytes | bytearray | memoryview], relaxed: bool = True) -> bytes:
    """The bh= value of the body given as `chunks`."""
    hasher = BodyHasher(relaxed)
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.b64digest()


class SigningError(MailgateError):
    """A domain has an active key that cannot be used (file missing or unreadable).

    Not a reason to send the message unsigned: the accept stage turns it into a temporary
    failure (451 4.3.0) and the operator sees the key path in the log.
    """


class DomainLookup(Protocol):
    """The part of `mailgate.directory.Directory` that signing needs."""

    def get_domain(self, name: str) -> Domain | None: ...


def signed_header_names(present: list[bytes]) -> list[bytes]:
    """The h= list for a message whose header field names are `present` (top to bottom).

    Present instances of `SIGNED_HEADERS` in message order, then each name of the set once
    more: a verifier finds no field for that extra entry and hashes nothing, which is how
    RFC 6376 §5.4.2 lets a signer forbid additions.
    """
    wanted = {n.encode("ascii") for n in SIGNED_HEADERS}
    names = [n.lower() for n in present if n.lower() in wanted]
    return names + [n.encode("ascii") for n in SIGNED_HEADERS]


@dataclass(frozen=True, slots=True)
class _LoadedKey:
    stamp: tuple[int, int, int]  # (st_ino, st_size, st_mtime_ns) of the file it was read from
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign the SHA-256 hash of the canonicalised header fields.

        RSA: RSASSA-PKCS1-v1_5 over the hash (RFC 6376 §3.3.1, RFC 8017 §8.2); OpenSSL blinds
        the private operation. Ed25519: RFC 8463 §3 signs the 32-octet hash itself (PureEdDSA).
        """
        if isinstance(self.private, rsa.RSAPrivateKey):
            return self.private.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        return self.private.sign(digest)


class Signer:
    """Signs messages with the active keys of a domain; safe to share between threads."""

    def __init__(self, directory: DomainLookup) -> None:
        self._directory = directory
        self._keys: dict[Path, _LoadedKey] = {}
        self._lock = threading.Lock()

    def sign(self, message: bytes, domain: str) -> bytes:
        """`sign_section` for a whole message (CRLF line endings), parsed by the same rule."""
        section = header_section.parse(message, limit=len(message))
        return self.sign_section(section, body_hash([message[section.body_offset :]]), domain)

    def may_sign(self, domain: str) -> bool:
        """Whether `domain` has an active key (so the body hash is worth computing)."""
        record = self._directory.get_domain(domain.lower().rstrip("."))
        return record is not None and any(k.active for k in record.keys)

    def sign_section(self, section: HeaderSection, bh: bytes, domain: str) -> bytes:
        """The DKIM-Signature field(s) to prepend (CRLF-terminated, folded), or b"".

        `section` is the header section exactly as it will be spooled, `bh` the bh= value of
        the body that follows it (`body_hash()`, relaxed). With an RSA and an
        Ed25519 key both active, the RSA signature comes first: a verifier that knows only RSA
        and reads the topmost signature still finds one it understands.
        """
        record = self._directory.get_domain(domain.lower().rstrip("."))
        if record is None:
            return b""
        active = [k for k in record.keys if k.active]
        keys = sorted(active, key=lambda k: k.algorithm != ALGORITHM_RSA)  # stable: RSA first
        if not keys:
            return b""
        # dkimpy's (name, value) pairs, from our parse: the value keeps its folding and CRLF.
        headers = [(f.name.encode("ascii"), f.value) for f in section.fields]
        include = signed_header_names(section.names())
        policy = CanonicalizationPolicy.from_c_value(CANONICALIZATION)
        canonical_headers = policy.canonicalize_headers(headers)
        now = str(int(time.time())).encode("ascii")
        d = record.name.encode("ascii")
        fields: list[bytes] = []
        for key in keys:
            loaded = self._load(key.key_path, key.algorithm)
            tags = [
                (b"v", b"1"),
                (b"a", key.algorithm.encode("ascii")),
                (b"c", CANONICALIZATION),
                (b"d", d),
                (b"s", key.selector.encode("ascii")),
                (b"t", now),
                # Spaces around the colons give the folding a place to break: RFC 6376 §3.5
                # allows FWS around a colon but not inside a header field name.
                (b"h", b" : ".join(include)),
                (b"bh", bh),  # both algorithms hash the body with SHA-256: one hash
                # A placeholder as long as a signature, so that the folding of the tags before
                # it does not move when the real b= is filled in (dkimpy's own convention).
                (b"b", b"0" * 60),
            ]
            fields.append(_signature_field(tags, include, canonical_headers, policy, loaded))
        return b"".join(fields)

    def _load(self, path: Path, algorithm: str) -> _LoadedKey:
        """The key at `path`, read again only when the file changed (a rotation writes a new
        file; an operator may replace one in place)."""
        try:
            st = os.stat(path)
        except OSError as e:
            raise SigningError(f"{path}: DKIM key unavailable: {e.strerror}") from None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._keys.get(path)
            if cached is not None and cached.stamp == stamp:
                return cached
        if st.st_mode & 0o077:
            log.warning("dkim key %s is readable by group or others; it should be 0600", path)
        try:
            key = load_private_key(path)
        except MailgateError as e:
            raise SigningError(str(e)) from None
        want = rsa.RSAPrivateKey if algorithm == ALGORITHM_RSA else ed25519.Ed25519PrivateKey
        if algorithm not in (ALGORITHM_RSA, ALGORITHM_ED25519) or not isinstance(key, want):
            raise SigningError(f"{path}: key type does not match algorithm {algorithm}")
        loaded = _LoadedKey(stamp, key)
        with self._lock:
            self._keys[path] = loaded
        log.info("dkim key loaded path=%s algorithm=%s", path, algorithm)
        return loaded


_NAME = b"DKIM-Signature"


def _signature_field(
    tags: list[tuple[bytes, bytes]],
    include: list[bytes],
    canonical_headers: list[tuple[bytes, bytes]],
    policy: CanonicalizationPolicy,
    key: _LoadedKey,
) -> bytes:
    """One folded, CRLF-terminated DKIM-Signature field (RFC 6376 §3.7).

    The header hash covers the selected fields and then this field itself with an empty b=
    and no trailing CRLF; dkimpy's helpers do that part exactly as its verifier does.
    """
    value = dkim.fold(b"; ".join(b"=".join(t) for t in tags), namelen=len(_NAME))
    unsigned = (_NAME, b" " + dkim.RE_BTAG.sub(b"\\1", value))
    hasher = hashlib.sha256()
    dkim.hash_headers(hasher, policy, canonical_headers, include, unsigned, None)
    signature = base64.b64encode(key.sign_digest(hasher.digest()))
    tags = [*tags[:-1], (b"b", signature)]
    value = dkim.fold(b"; ".join(b"=".join(t) for t in tags) + b"\r\n", namelen=len(_NAME))
    return _NAME + b": " + bytes(value)

"""Signatures made by `Signer` verify with dkimpy's verifier, which fetches the keys over
loopback DNS from a server publishing exactly what `mailgate domain dns` printed."""

from __future__ import annotations

import re

from mailgate.message.dkim import Signer
from tests.dkim.conftest import Site
from tests.dkim.verifier import verify_all

DOMAIN = "college.example.ac.uk"

MESSAGE = (
    b"Received: from [10.1.2.3] (client.example.ac.uk [10.1.2.3])\r\n"
    b"\tby mail.example.ac.uk with ESMTPSA id 8F3K2A; Sat, 28 Nov 2026 12:00:00 +0000\r\n"
    b"From: Bursar <bursar@college.example.ac.uk>\r\n"
    b"To: Alice <alice@example.net>, Bob <bob@example.net>\r\n"
    b"Subject: Fees for the Michaelmas term\r\n"
    b"Date: Sat, 28 Nov 2026 12:00:00 +0000\r\n"
    b"Message-ID: <fees-2026@college.example.ac.uk>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Dear student,\r\n"
    b"\r\n"
    b"The fees are due.\r\n"
)


def signed(site: Site, message: bytes = MESSAGE) -> bytes:
    with site.directory() as directory:
        return Signer(directory).sign(message, DOMAIN) + message


def selectors(message: bytes) -> list[str]:
    return re.findall(r"(?:^|;)\s*s=([a-z0-9-]+);", message.decode("utf-8", "replace"), re.M)


def test_rsa_signature_verifies_over_dns(site: Site) -> None:
    assert site.run("domain", "add", DOMAIN).status == 0
    site.publish(DOMAIN)
    message = signed(site)
    assert message.count(b"DKIM-Signature:") == 1
    assert b"a=rsa-sha256" in message
    assert verify_all(message, site.dnsfunc()) == [True]


def test_rsa_and_ed25519_both_verify_and_each_on_its_own(site: Site) -> None:
    assert site.run("domain", "add", DOMAIN, "--ed25519").status == 0
    site.publish(DOMAIN)
    message = signed(site)
    rsa, ed = selectors(message)
    assert ed == rsa + "-ed"
    assert verify_all(message, site.dnsfunc()) == [True, True]
    # Without the RSA record only the Ed25519 signature verifies (RFC 8463 §1: a verifier
    # that knows Ed25519 has a signature it trusts), and the other way round.
    site.dns.remove(f"{rsa}._domainkey.{DOMAIN}")
    assert verify_all(message, site.dnsfunc()) == [False, True]
    site.publish(DOMAIN)
    site.dns.remove(f"{ed}._domainkey.{DOMAIN}")
    assert verify_all(message, site.dnsfunc()) == [True, False]


def test_rotation_keeps_old_signatures_valid_until_the_old_key_is_removed(site: Site) -> None:
    assert site.run("domain", "add", DOMAIN, "--ed25519").status == 0
    site.publish(DOMAIN)
    before = signed(site)
    old = selectors(before)

    rotated = site.run("domain", "rotate-key", DOMAIN)
    assert rotated.status == 0, rotated.err
    site.publish(DOMAIN)
    after = signed(site)
    new = selectors(after)
    assert set(new).isdisjoint(old) and len(new) == 2
    hint = f"; retired (keep published until `mailgate domain remove-key {DOMAIN} SELECTOR`):"
    assert hint in rotated.out
    # Both generations are published: mail in transit verifies, new mail too.
    assert verify_all(before, site.dnsfunc()) == [True, True]
    assert verify_all(after, site.dnsfunc()) == [True, True]

    for selector in old:
        removed = site.run("domain", "remove-key", DOMAIN, selector)
        assert removed.status == 0, removed.err
    site.publish(DOMAIN)
    assert verify_all(before, site.dnsfunc()) == [False, False]
    assert verify_all(after, site.dnsfunc()) == [True, True]


def test_8bit_body_long_lines_and_trailing_whitespace(site: Site) -> None:
    assert site.run("domain", "add", DOMAIN, "--ed25519").status == 0
    site.publish(DOMAIN)
    body = (
        "Grüße aus dem Büro — 学費のお知らせ — Ελληνικά\r\n".encode()
        + b"x" * 990  # RFC 5321 §4.5.3.1.6: up to 998 octets plus CRLF
        + b"\r\n"
        + b"trailing spaces   \r\n"
        + b"trailing tab\t\r\n"
        + b"\r\n\r\n\r\n"  # empty lines at the end (RFC 6376 §3.4.4: ignored)
    )
    message = signed(site, MESSAGE + body)
    assert verify_all(message, site.dnsfunc()) == [True, True]
    # A relay that strips trailing whitespace and the empty lines at the end: relaxed body
    # canonicalisation gives the same hash.
    stripped = re.sub(rb"[ \t]+\r\n", b"\r\n", message).rstrip(b"\r\n") + b"\r\n"
    assert stripped != message
    assert verify_all(stripped, site.dnsfunc()) == [True, True]
    # But a changed character in the 8-bit text breaks both.
    assert verify_all(message.replace("Grüße".encode(), b"Gruesse"), site.dnsfunc()) == [
        False,
        False,
    ]


def refold(message: bytes) -> bytes:
    """What a clumsy intermediate server does to the header: unfold every field, upper-case
    its name, put two spaces after the colon, and fold again at every other space; the DKIM-
    Signature fields are folded differently too."""
    head, body = message.split(b"\r\n\r\n", 1)
    fields = re.split(rb"\r\n(?![ \t])", head)
    out = []
    for field in fields:
        name, _, value = field.partition(b":")
        value = re.sub(rb"\r\n([ \t])", rb"\1", value)  # unfold
        words = value.split()
        folded = b""
        for i, word in enumerate(words):
            folded += (b"\r\n\t" if i % 2 == 0 and i > 1 else b" " if i else b"") + word
        out.append(name.upper() + b":  " + folded)
    return b"\r\n".join(out) + b"\r\n\r\n" + body


def test_refolded_header_still_verifies(site: Site) -> None:
    assert site.run("domain", "add", DOMAIN, "--ed25519").status == 0
    site.publish(DOMAIN)
    message = signed(site)
    changed = refold(message)
    assert b"\r\nSUBJECT:  Fees for\r\n\tthe Michaelmas\r\n\tterm\r\n" in changed
    assert changed != message
    assert verify_all(changed, site.dnsfunc()) == [True, True]

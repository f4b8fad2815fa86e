"""Which LDAP attribute values become addresses (auth/ldap.py), without a server."""

from __future__ import annotations

from mailgate.auth.ldap import LdapBackend
from mailgate.config import LdapConfig


def test_addresses_from_mail_and_alias_attributes() -> None:
    cfg = LdapConfig(base="dc=x", alias_attributes=("proxyAddresses", "mailAlternateAddress"))
    backend = LdapBackend(cfg, default_domain="example.org")
    try:
        identity = backend._identity("carol", {
            "MAIL": [b"carol@example.org"],
            "proxyAddresses": [b"SMTP:Carol.Smith@example.org", b"smtp:cs@college.example.org",
                               b"X500:/o=ExchangeLabs/cn=carol", b"SIP:carol@example.org"],
            "mailAlternateAddress": [b"dean@college.example.org", b"not-an-address"],
        })  # fmt: skip
        assert identity.addresses == (
            "carol@example.org", "Carol.Smith@example.org", "cs@college.example.org",
            "dean@college.example.org",
        )  # fmt: skip
        # Without a mail value, the primary address is LOGIN@default_domain.
        assert backend._identity("erin", {}).addresses == ("erin@example.org",)
    finally:
        backend.close()

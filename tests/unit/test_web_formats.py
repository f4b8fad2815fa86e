"""The set-up documents mail programs fetch, and the one HTML escaping rule (mailgate.web).

Each document is parsed back the way a client reads it: the XML with a parser, the profile
with plistlib, a signed profile with `openssl cms -verify` against the CA that issued the
service certificate.
"""

from __future__ import annotations

import plistlib
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from mailgate import config
from mailgate.config import Config
from mailgate.web import setup_formats
from mailgate.web.html import Html, join, page, render
from mailgate.web.mailprograms import BadAddress, parse_address, settings_for, username_rule
from tests.support.testca import TestCA

BASE = """hostname = "mail.example.org"
[directory]
default_domain = "example.org"
[submission]
listen = ["127.0.0.1:587"]
[submissions]
listen = ["127.0.0.1:465"]
"""


def cfg(extra: str = "") -> Config:
    return config.parse(BASE + extra, Path("/srv/mailgate/mailgate.toml"))


def parse_xml(body: bytes) -> ET.Element:
    return ET.fromstring(body)  # noqa: S314 - mailgate's own output, read in a test


ALICE = parse_address("alice@example.org")
TB = {"": ""}  # Thunderbird's autoconfig has no namespace
OUTLOOK_NS = {"a": setup_formats.OUTLOOK_RESPONSE_NS, "d": setup_formats.AUTODISCOVER_NS}


# --- the model ---------------------------------------------------------------------------------


def test_address_domain_is_normalised_and_bad_ones_are_refused() -> None:
    assert str(parse_address(" Bob.Smith@EXAMPLE.org ")) == "Bob.Smith@example.org"
    for bad in ["", "alice", "@example.org", "alice@", "a b@example.org", "<x>@example.org",
                "alice@exa mple.org", "a@" + "x" * 260]:  # fmt: skip
        with pytest.raises(BadAddress):
            parse_address(bad)


def test_username_follows_the_backend() -> None:
    assert username_rule(cfg()) == "localpart"  # directory: LOGIN@default_domain
    ldap_uid = '[auth]\nbackend = "ldap"\n[auth.ldap]\nbase = "dc=x"\nfilter = "(uid={login})"\n'
    assert username_rule(cfg(ldap_uid)) == "localpart"
    ldap_mail = '[auth]\nbackend = "ldap"\n[auth.ldap]\nbase = "dc=x"\nfilter = "(mail={login})"\n'
    assert username_rule(cfg(ldap_mail)) == "address"
    dovecot = '[auth]\nbackend = "dovecot"\n[auth.dovecot]\nsocket = "tcp:127.0.0.1:1"\n'
    assert username_rule(cfg(dovecot)) == "localpart"
    assert username_rule(cfg('[web]\nusername = "address"\n')) == "address"
    assert settings_for(cfg(ldap_mail), ALICE).username == "alice@example.org"
    assert settings_for(cfg(), ALICE).username == "alice"


def test_servers_come_from_the_listeners_465_first() -> None:
    settings = settings_for(cfg(), ALICE)
    assert [(s.hostname, s.port, s.security) for s in settings.outgoing] == [
        ("mail.example.org", 465, "SSL"),
        ("mail.example.org", 587, "STARTTLS"),
    ]
    assert settings.incoming is None
    imap = settings_for(cfg('[web]\nimap = "imap.example.org:993"\n'), ALICE).incoming
    assert imap is not None and (imap.hostname, imap.port, imap.security) == (
        "imap.example.org", 993, "SSL")  # fmt: skip


# --- Thunderbird -------------------------------------------------------------------------------


def test_thunderbird_autoconfig() -> None:
    body = setup_formats.thunderbird(
        settings_for(cfg('[web]\nimap = "imap.example.org:993"\n'), ALICE),
        settings_url="https://mail.example.org/settings?emailaddress=alice@example.org",
    )
    root = parse_xml(body)
    assert root.tag == "clientConfig" and root.get("version") == "1.1"
    provider = root.find("emailProvider")
    assert provider is not None and provider.get("id") == "example.org"
    assert provider.findtext("domain") == "example.org"
    servers = [
        {c.tag: c.text for c in s} | {"type": s.get("type")}
        for s in provider.findall("outgoingServer")
    ]
    assert servers == [
        {"type": "smtp", "hostname": "mail.example.org", "port": "465", "socketType": "SSL",
         "authentication": "password-cleartext", "username": "alice"},
        {"type": "smtp", "hostname": "mail.example.org", "port": "587",
         "socketType": "STARTTLS", "authentication": "password-cleartext", "username": "alice"},
    ]  # fmt: skip
    incoming = provider.find("incomingServer")
    assert incoming is not None and incoming.get("type") == "imap"
    assert incoming.findtext("hostname") == "imap.example.org"
    assert incoming.findtext("socketType") == "SSL"
    doc = provider.find("documentation")
    assert doc is not None and doc.get("url", "").endswith("emailaddress=alice@example.org")


def test_thunderbird_unknown_domain_is_an_empty_config_saying_why() -> None:
    body = setup_formats.thunderbird_unknown("other--thing.example")
    root = parse_xml(body)
    assert root.tag == "clientConfig" and list(root) == []
    assert b"not a mail domain served here" in body


# --- Outlook -----------------------------------------------------------------------------------

STANDARD_REQUEST = b"""<?xml version="1.0" encoding="utf-8"?>
<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">
  <Request>
    <EMailAddress>alice@example.org</EMailAddress>
    <AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema>
  </Request>
</Autodiscover>
"""


def test_autodiscover_request_is_read() -> None:
    address, schema = setup_formats.read_autodiscover_request(STANDARD_REQUEST)
    assert address == "alice@example.org"
    assert schema == setup_formats.OUTLOOK_RESPONSE_NS


@pytest.mark.parametrize(
    "body",
    [
        # billion laughs: refused at the DTD, nothing expanded
        b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;&a;">]>'
        b"<Autodiscover><Request><EMailAddress>&b;</EMailAddress></Request></Autodiscover>",
        # an external entity
        b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b"<Autodiscover><Request><EMailAddress>&x;</EMailAddress></Request></Autodiscover>",
        # an undeclared entity
        b"<Autodiscover><Request><EMailAddress>&x;</EMailAddress></Request></Autodiscover>",
        b"<Autodiscover><Request></Request></Autodiscover>",
        b"not xml",
        b"<a>" + b"x" * (setup_formats.MAX_REQUEST + 1) + b"</a>",
    ],
)
def test_autodiscover_refuses_dtds_entities_and_junk(body: bytes) -> None:
    with pytest.raises(setup_formats.BadRequest):
        setup_formats.read_autodiscover_request(body)


def test_autodiscover_response() -> None:
    root = parse_xml(setup_formats.outlook(settings_for(cfg(), ALICE)))
    assert root.tag == f"{{{setup_formats.AUTODISCOVER_NS}}}Autodiscover"
    account = root.find("a:Response/a:Account", OUTLOOK_NS)
    assert account is not None
    assert account.findtext("a:AccountType", namespaces=OUTLOOK_NS) == "email"
    assert account.findtext("a:Action", namespaces=OUTLOOK_NS) == "settings"
    protocols = [
        {c.tag.split("}")[1]: c.text for c in p} for p in account.findall("a:Protocol", OUTLOOK_NS)
    ]
    assert [(p["Type"], p["Server"], p["Port"], p["Encryption"], p["LoginName"], p["SSL"],
             p["AuthRequired"]) for p in protocols] == [
        ("SMTP", "mail.example.org", "465", "SSL", "alice", "on", "on"),
        ("SMTP", "mail.example.org", "587", "TLS", "alice", "on", "on"),
    ]  # fmt: skip


def test_autodiscover_error() -> None:
    root = parse_xml(setup_formats.outlook_error(500, "The e-mail address cannot be found"))
    code = root.findtext("d:Response/d:Error/d:ErrorCode", namespaces=OUTLOOK_NS)
    assert code == "500"


# --- Apple -------------------------------------------------------------------------------------


def test_mobileconfig_is_a_plist_with_the_outgoing_server() -> None:
    data = setup_formats.apple_profile(settings_for(cfg(), ALICE), organisation="mail.example.org")
    profile = plistlib.loads(data)
    assert profile["PayloadType"] == "Configuration" and profile["PayloadVersion"] == 1
    (mail,) = profile["PayloadContent"]
    assert mail["PayloadType"] == "com.apple.mail.managed"
    assert mail["EmailAddress"] == "alice@example.org"
    assert mail["EmailAccountType"] == "EmailTypeIMAP"
    assert mail["OutgoingMailServerHostName"] == "mail.example.org"
    assert mail["OutgoingMailServerPortNumber"] == 465
    assert mail["OutgoingMailServerUseSSL"] is True
    assert mail["OutgoingMailServerUsername"] == "alice"
    assert mail["OutgoingMailServerAuthentication"] == "EmailAuthPassword"
    # the same address gives the same identifiers: installing again replaces the profile
    again = plistlib.loads(
        setup_formats.apple_profile(settings_for(cfg(), ALICE), organisation="mail.example.org")
    )
    assert again["PayloadUUID"] == profile["PayloadUUID"]


def test_mobileconfig_signed_with_a_ca_certificate_verifies(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    issued = ca.issue("mail.example.org")
    profile = setup_formats.apple_profile(settings_for(cfg(), ALICE),
                                          organisation="mail.example.org")  # fmt: skip
    signed = setup_formats.sign_profile(profile, issued.cert, issued.key)
    assert signed is not None
    (tmp_path / "p.der").write_bytes(signed)
    out = subprocess.run(
        ["openssl", "cms", "-verify", "-inform", "DER", "-in", str(tmp_path / "p.der"),
         "-CAfile", str(ca.cert_path), "-purpose", "any"],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert b"Verification successful" in out.stderr
    assert plistlib.loads(out.stdout)["PayloadContent"][0]["EmailAddress"] == "alice@example.org"
    # another CA does not vouch for it
    other = TestCA(tmp_path / "other", name="another CA")
    refused = subprocess.run(
        ["openssl", "cms", "-verify", "-inform", "DER", "-in", str(tmp_path / "p.der"),
         "-CAfile", str(other.cert_path), "-purpose", "any"],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert refused.returncode != 0


def test_mobileconfig_with_a_self_signed_certificate_is_not_signed(tmp_path: Path) -> None:
    from mailgate import tlscert

    cert, key = tlscert.generate_self_signed("mail.example.org")
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    signed = setup_formats.sign_profile(b"<plist/>", tmp_path / "cert.pem", tmp_path / "key.pem")
    assert signed is None


# --- HTML --------------------------------------------------------------------------------------

HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>\"'&"


def test_render_escapes_every_value_but_html() -> None:
    out = render("<p title={v}>{v}</p>{ok}", v=HOSTILE, ok=Html("<b>ours</b>"))
    assert "<script>" not in out and "<img" not in out
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;" in out
    assert "&quot;&#x27;&amp;" in out
    assert out.endswith("<b>ours</b>")
    assert isinstance(out, Html)


def test_render_refuses_attribute_access_and_join_refuses_plain_text() -> None:
    with pytest.raises(ValueError):
        render("{v.__class__}", v="x")
    with pytest.raises(ValueError):
        render("{v!r}", v="x")
    with pytest.raises(TypeError):
        join([Html("<p>"), HOSTILE])  # type: ignore[list-item] # the point of the test
    document = page(HOSTILE, Html("<p>body</p>"))
    assert "<title>&lt;script&gt;" in document

"""The set-up documents mail programs fetch: Thunderbird's autoconfig, Outlook's autodiscover
(POX) and Apple's configuration profile, all from one `MailSettings`.

Owns: their XML and property-list shapes, reading an autodiscover request safely, and signing
a profile with the service certificate. Must not: decide settings (mailprograms.py does) or
do network I/O.

References: Thunderbird's autoconfig format (wiki.mozilla.org/Thunderbird:Autoconfiguration:
ConfigFileFormat, clientConfig version 1.1); Outlook's POX autodiscover ([MS-OXDSCLI] §2.2:
request schema .../outlook/requestschema/2006, response .../outlook/responseschema/2006a);
Apple's Configuration Profile Reference (com.apple.mail.managed payload); CMS SignedData
(RFC 5652) for signed profiles.
"""

from __future__ import annotations

import logging
import plistlib
import uuid
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from xml.parsers import expat

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7

from mailgate.web.mailprograms import MailSettings, Server

log = logging.getLogger(__name__)

# --- Thunderbird ------------------------------------------------------------------------------

_TB_SOCKET = {"SSL": "SSL", "STARTTLS": "STARTTLS"}


def thunderbird(settings: MailSettings, *, settings_url: str) -> bytes:
    """clientConfig 1.1 for one address: the outgoing servers (465 SSL, 587 STARTTLS) and the
    incoming one when configured. Thunderbird tries the servers in document order."""
    root = ET.Element("clientConfig", version="1.1")
    provider = ET.SubElement(root, "emailProvider", id=settings.address.domain)
    ET.SubElement(provider, "domain").text = settings.address.domain
    ET.SubElement(provider, "displayName").text = f"{settings.address.domain} mail"
    ET.SubElement(provider, "displayShortName").text = settings.address.domain
    if settings.incoming is not None:
        _tb_server(ET.SubElement(provider, "incomingServer", type="imap"),
                   settings.incoming, settings.username)  # fmt: skip
    for server in settings.outgoing:
        _tb_server(ET.SubElement(provider, "outgoingServer", type="smtp"),
                   server, settings.username)  # fmt: skip
    doc = ET.SubElement(provider, "documentation", url=settings_url)
    ET.SubElement(doc, "descr", lang="en").text = "Settings for your mail program"
    return _xml(root)


def _tb_server(element: ET.Element, server: Server, username: str) -> None:
    ET.SubElement(element, "hostname").text = server.hostname
    ET.SubElement(element, "port").text = str(server.port)
    ET.SubElement(element, "socketType").text = _TB_SOCKET[server.security]
    ET.SubElement(element, "authentication").text = "password-cleartext"  # inside TLS
    ET.SubElement(element, "username").text = username


def thunderbird_unknown(domain: str) -> bytes:
    """An empty clientConfig (served with 404) for a domain that is not ours: Thunderbird
    moves on to its next source; a person reading it sees why."""
    root = ET.Element("clientConfig", version="1.1")
    root.append(ET.Comment(f" {_comment_safe(domain)} is not a mail domain served here "))
    return _xml(root)


# --- Outlook (POX autodiscover) ---------------------------------------------------------------

AUTODISCOVER_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
OUTLOOK_RESPONSE_NS = (
    "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
)
OUTLOOK_REQUEST_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
MAX_REQUEST = 16 * 1024  # a request is a few hundred bytes


class BadRequest(ValueError):
    """An autodiscover request we do not read: not XML, a DTD, or no EMailAddress."""


def read_autodiscover_request(body: bytes) -> tuple[str, str]:
    """(EMailAddress, AcceptableResponseSchema or "") of a POX request.

    Parsed with the standard library's expat, refusing any document type declaration: no
    entity can be declared, so none is expanded (no "billion laughs", no external entities);
    an undeclared entity reference is a parse error in expat. Namespaces are not checked
    (clients differ), element names are.
    """
    if len(body) > MAX_REQUEST:
        raise BadRequest("request too large")
    parser = expat.ParserCreate(namespace_separator=" ")
    path: list[str] = []
    found: dict[str, str] = {}

    def refuse(*_: Any) -> None:
        raise BadRequest("document type declarations are not accepted")

    def start(name: str, _attrs: dict[str, str]) -> None:
        path.append(name.rpartition(" ")[2])

    def end(_name: str) -> None:
        path.pop()

    def text(data: str) -> None:
        if path[-2:] in (["Request", "EMailAddress"], ["Request", "AcceptableResponseSchema"]):
            found[path[-1]] = found.get(path[-1], "") + data

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    try:
        parser.Parse(body, True)
    except expat.ExpatError as e:
        raise BadRequest(f"not well-formed XML: {expat.ErrorString(e.code)}") from None
    address = found.get("EMailAddress", "").strip()
    if not address:
        raise BadRequest("no Request/EMailAddress")
    return address, found.get("AcceptableResponseSchema", "").strip()


def outlook(settings: MailSettings) -> bytes:
    """The POX response: one SMTP Protocol element per outgoing server (465 first)."""
    root = ET.Element("Autodiscover", xmlns=AUTODISCOVER_NS)
    response = ET.SubElement(root, "Response", xmlns=OUTLOOK_RESPONSE_NS)
    account = ET.SubElement(response, "Account")
    ET.SubElement(account, "AccountType").text = "email"
    ET.SubElement(account, "Action").text = "settings"
    if settings.incoming is not None:
        _outlook_protocol(account, "IMAP", settings.incoming, settings.username)
    for server in settings.outgoing:
        _outlook_protocol(account, "SMTP", server, settings.username)
    return _xml(root)


def _outlook_protocol(account: ET.Element, kind: str, server: Server, username: str) -> None:
    protocol = ET.SubElement(account, "Protocol")
    ET.SubElement(protocol, "Type").text = kind
    ET.SubElement(protocol, "Server").text = server.hostname
    ET.SubElement(protocol, "Port").text = str(server.port)
    ET.SubElement(protocol, "LoginName").text = username
    ET.SubElement(protocol, "DomainRequired").text = "off"
    ET.SubElement(protocol, "SPA").text = "off"
    # [MS-OXDSCLI] §2.2.4.1.1.2.1.1.9: Encryption "SSL" is TLS from the start, "TLS" STARTTLS.
    ET.SubElement(protocol, "SSL").text = "on"
    ET.SubElement(protocol, "Encryption").text = "SSL" if server.security == "SSL" else "TLS"
    ET.SubElement(protocol, "AuthRequired").text = "on"
    if kind == "SMTP":
        ET.SubElement(protocol, "UsePOPAuth").text = "off"
        ET.SubElement(protocol, "SMTPLast").text = "off"


def outlook_error(code: int, message: str) -> bytes:
    """An autodiscover Error response ([MS-OXDSCLI] §2.2.4.1.1.1): 500 "address not found",
    600 "invalid request", 601 "provider not available for the requested schema"."""
    root = ET.Element("Autodiscover", xmlns=AUTODISCOVER_NS)
    response = ET.SubElement(root, "Response")
    error = ET.SubElement(response, "Error", Time=datetime.now(UTC).strftime("%H:%M:%S.%f"), Id="0")
    ET.SubElement(error, "ErrorCode").text = str(code)
    ET.SubElement(error, "Message").text = message
    ET.SubElement(error, "DebugData")
    return _xml(root)


# --- Apple configuration profile --------------------------------------------------------------


def apple_profile(settings: MailSettings, *, organisation: str) -> bytes:
    """A .mobileconfig (XML property list) with one com.apple.mail.managed payload. The UUIDs
    are derived from the server and the address, so installing it again replaces it."""
    address = str(settings.address)
    outgoing = settings.outgoing[0] if settings.outgoing else None
    # Apple requires an incoming server; without [web] imap the mail host is named (docs).
    incoming = settings.incoming or Server(organisation, 993, "SSL")
    base = ".".join(reversed(organisation.split("."))) + ".mailgate"
    account: dict[str, Any] = {
        "PayloadType": "com.apple.mail.managed",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"{base}.mail.{_uuid(organisation, 'mail', address)}",
        "PayloadUUID": _uuid(organisation, "mail", address),
        "PayloadDisplayName": f"Mail: {address}",
        "EmailAccountDescription": address,
        "EmailAccountType": "EmailTypeIMAP",
        "EmailAddress": address,
        "IncomingMailServerAuthentication": "EmailAuthPassword",
        "IncomingMailServerHostName": incoming.hostname,
        "IncomingMailServerPortNumber": incoming.port,
        "IncomingMailServerUseSSL": True,
        "IncomingMailServerUsername": settings.username,
        "OutgoingPasswordSameAsIncomingPassword": True,
    }
    if outgoing is not None:
        account |= {
            "OutgoingMailServerAuthentication": "EmailAuthPassword",
            "OutgoingMailServerHostName": outgoing.hostname,
            "OutgoingMailServerPortNumber": outgoing.port,
            # Apple's one switch for both: implicit TLS on 465, STARTTLS on 587.
            "OutgoingMailServerUseSSL": True,
            "OutgoingMailServerUsername": settings.username,
        }
    profile = {
        "PayloadContent": [account],
        "PayloadDisplayName": f"{settings.address.domain} mail",
        "PayloadDescription": f"Sends mail from {address} through {organisation}",
        "PayloadIdentifier": f"{base}.profile.{_uuid(organisation, 'profile', address)}",
        "PayloadOrganization": organisation,
        "PayloadRemovalDisallowed": False,
        "PayloadType": "Configuration",
        "PayloadUUID": _uuid(organisation, "profile", address),
        "PayloadVersion": 1,
    }
    return plistlib.dumps(profile, fmt=plistlib.FMT_XML, sort_keys=True)


def _uuid(*parts: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "mailgate:" + "/".join(parts))).upper()


def sign_profile(profile: bytes, cert: Path, key: Path) -> bytes | None:
    """The profile as CMS SignedData (DER, content included) signed with the service
    certificate, or None when it should go unsigned: a self-signed certificate (a device
    would only show "not verified" anyway) or a key type CMS signing does not take here."""
    chain = x509.load_pem_x509_certificates(cert.read_bytes())
    leaf = chain[0]
    if is_self_signed(leaf):
        return None
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    if not isinstance(private, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        log.warning("mobileconfig not signed: %s keys are not supported for CMS signing",
                    type(private).__name__)  # fmt: skip
        return None
    builder = (
        pkcs7.PKCS7SignatureBuilder().set_data(profile).add_signer(leaf, private, hashes.SHA256())
    )
    for extra in chain[1:]:  # the intermediates, so a device can build the path
        builder = builder.add_certificate(extra)
    signed: bytes = builder.sign(serialization.Encoding.DER, [])
    return signed


def is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):  # named itself, signed by another key
        return False
    return True


# --- shared -----------------------------------------------------------------------------------


def _xml(root: ET.Element) -> bytes:
    ET.indent(root)
    text: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + text


def _comment_safe(text: str) -> str:
    # XML 1.0 §2.5: "--" must not occur inside a comment.
    return text.replace("-", "\N{HYPHEN}") if "--" in text else text

"""The headers mailgate adds to an accepted message.

Owns: building Received: (RFC 5321 §4.4, `with` keywords from RFC 3848), Sender:
(RFC 5322 §3.6.2), Message-ID: and Date: (RFC 6409 §8.2, §8.3), X-Scanned-By:. Must not: read the
client's header section (message/headers.py is the one parse of it), touch the body, the spool
or the network. All headers are returned as CRLF-terminated bytes, folded
below 78 columns where they can be (RFC 5322 §2.1.1).
"""

from __future__ import annotations

import email.utils
import secrets
from datetime import UTC, datetime

from mailgate.dnsname import domain_name
from mailgate.netaddr import address_literal
from mailgate.values import Trace


def received(trace: Trace, *, hostname: str, qid: str, recipients: list[str],
             now: datetime | None = None) -> bytes:  # fmt: skip
    """The Received: field mailgate prepends (RFC 5321 §4.4)."""
    ip = f"IPv6:{trace.client_ip}" if ":" in trace.client_ip else trace.client_ip
    # RFC 5321 §4.4: From-domain is a Domain or an address-literal. An EHLO argument that is
    # neither ("x; by trusted.example ...") would let the client write clauses of its own:
    # it is replaced by the client's address literal (the log keeps what it said).
    helo = trace.client_helo if _is_helo_domain(trace.client_helo) else f"[{ip}]"
    name = _comment_safe(trace.client_name).replace(" ", "")
    tcp_info = f"{name} [{ip}]" if name else f"[{ip}]"
    lines = [
        f"Received: from {helo} ({tcp_info})",
        f"\tby {hostname} (mailgate {trace.service} port {trace.port})",
        f"\twith {trace.with_keyword} id {qid}",
    ]
    details = []
    if trace.tls:
        details.append(f"({_comment_safe(trace.tls)})")
    if trace.login is not None:
        details.append(f"({trace.mechanism}:{_comment_safe(trace.login)})")
    if details:
        lines.append("\t" + " ".join(details))
    # One recipient only: naming several would disclose Bcc recipients to each other.
    if len(recipients) == 1 and _path_safe(recipients[0]):
        lines.append(f"\tfor <{recipients[0]}>;")
    else:
        lines[-1] += ";"
    lines.append("\t" + email.utils.format_datetime(now or datetime.now(UTC)))
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def sender(address: str) -> bytes:
    return f"Sender: <{address}>\r\n".encode()


def message_id(hostname: str, qid: str) -> bytes:
    return f"Message-ID: <{qid}.{secrets.token_hex(6)}@{hostname}>\r\n".encode()


def date(now: datetime | None = None) -> bytes:
    return f"Date: {email.utils.format_datetime(now or datetime.now(UTC))}\r\n".encode()


def scanned_by(value: str) -> bytes:
    """X-Scanned-By is unstructured text: only line breaks and control characters go."""
    if value.isprintable():  # the usual case: one C-level scan, no loop per character
        text = value[:200]
    else:
        text = "".join(c for c in value if c.isprintable())[:200]
    return f"X-Scanned-By: {text}\r\n".encode()


def _is_helo_domain(helo: str) -> bool:
    """A Domain (RFC 5321 §4.1.2: LDH labels, dnsname's rule) or an IPv4/IPv6 address literal
    (§4.1.3)."""
    if helo.endswith("."):
        return False  # a Domain has no final dot
    return address_literal(helo) is not None or domain_name(helo) is not None


def _comment_safe(text: str) -> str:
    """No CR, LF, parentheses or control characters: a client cannot break the header."""
    if text.isprintable() and "(" not in text and ")" not in text and "\\" not in text:
        return text[:200]  # the usual case: C-level scans, no loop per character
    return "".join(c for c in text if c.isprintable() and c not in "()\\")[:200]


def _path_safe(address: str) -> bool:
    if address.isprintable():  # no CR, LF or other control character
        return "<" not in address and ">" not in address
    return all(c.isprintable() and c not in "<>\r\n" for c in address)

"""The headers mailgate adds to an accepted message, and the few it reads.

Owns: reading the header block (From:, Sender:, Message-ID:, Date:, the Received: count) without a
full MIME parse, and building Received: (RFC 5321 §4.4, `with` keywords from RFC 3848), Sender:
(RFC 5322 §3.6.2), Message-ID: and Date: (RFC 6409 §8.2, §8.3), X-Scanned-By:. Must not: touch
the body, the spool or the network. All headers are returned as CRLF-terminated bytes, folded
below 78 columns where they can be (RFC 5322 §2.1.1).
"""

from __future__ import annotations

import email.utils
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

_MAX_HEADER_BYTES = 256 * 1024  # a header block larger than this is not inspected further


@dataclass(frozen=True, slots=True)
class HeaderSummary:
    """What the accept stage needs from the header block."""

    from_addresses: tuple[str, ...] = ()
    has_message_id: bool = False
    has_date: bool = False
    has_sender: bool = False
    received_count: int = 0
    message_id: str = ""  # the first Message-ID: field's value, as written
    header_names: frozenset[str] = field(default_factory=frozenset)


def header_block(message: bytes) -> bytes:
    """The bytes of the header section, up to and excluding the empty line."""
    if message.startswith(b"\r\n"):
        return b""  # an empty header section (RFC 5322 §3.5): everything is body
    end = message.find(b"\r\n\r\n", 0, _MAX_HEADER_BYTES)
    if end == -1:
        # No body separator: the whole (bounded) message is headers (RFC 5322 §3.5: body optional).
        return message[:_MAX_HEADER_BYTES]
    return message[: end + 2]


def iter_fields(block: bytes) -> Iterator[tuple[str, str]]:
    """(lower-case name, unfolded value) for each header field; malformed lines are skipped."""
    name: str | None = None
    parts: list[str] = []
    for line in block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and name is not None:
            parts.append(line.decode("utf-8", "replace"))
            continue
        if name is not None:
            yield name, "".join(parts).strip()
            name = None
        colon = line.find(b":")
        if colon <= 0:
            continue
        raw_name = line[:colon]
        if not raw_name.isascii() or b" " in raw_name or b"\t" in raw_name:
            continue
        name = raw_name.decode("ascii").lower()
        parts = [line[colon + 1 :].decode("utf-8", "replace")]
    if name is not None:
        yield name, "".join(parts).strip()


def summarize(message: bytes) -> HeaderSummary:
    """Read the header block once for everything the accept stage asks."""
    froms: list[str] = []
    names: set[str] = set()
    received = 0
    message_id = ""
    for name, value in iter_fields(header_block(message)):
        names.add(name)
        if name == "from":
            froms.extend(addr for _, addr in email.utils.getaddresses([value]) if addr)
        elif name == "received":
            received += 1
        elif name == "message-id" and not message_id:
            message_id = value
    return HeaderSummary(
        from_addresses=tuple(a.strip() for a in froms),
        has_message_id="message-id" in names,
        has_date="date" in names,
        has_sender="sender" in names,
        received_count=received,
        message_id=message_id,
        header_names=frozenset(names),
    )


@dataclass(frozen=True, slots=True)
class Trace:
    """Facts about the session for the Received: header.

    with_keyword: RFC 3848: ESMTP, ESMTPS (TLS), ESMTPA (AUTH), ESMTPSA (both), SMTP (HELO).
    """

    client_helo: str
    client_ip: str
    client_name: str  # reverse DNS name or "" when unknown
    service: str
    port: int
    with_keyword: str
    tls: str  # "TLSv1.3:TLS_AES_256_GCM_SHA384" or ""
    login: str | None
    mechanism: str | None


def with_keyword(*, extended: bool, tls: bool, authenticated: bool) -> str:
    """RFC 3848 §1 / RFC 5321 §4.4 protocol keyword."""
    if not extended:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")


def received(trace: Trace, *, hostname: str, qid: str, recipients: list[str],
             now: datetime | None = None) -> bytes:  # fmt: skip
    """The Received: field mailgate prepends (RFC 5321 §4.4)."""
    ip = f"IPv6:{trace.client_ip}" if ":" in trace.client_ip else trace.client_ip
    helo = _comment_safe(trace.client_helo) or "unknown"
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
    text = "".join(c for c in value if c.isprintable())[:200]
    return f"X-Scanned-By: {text}\r\n".encode()


def remove_fields(block: bytes, name: str) -> bytes:
    """The header block without every field called `name` (with its folded lines)."""
    lower = name.lower().encode() + b":"
    out: list[bytes] = []
    skipping = False
    for line in block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                out.append(line)
            continue
        skipping = line[: len(lower)].lower() == lower
        if not skipping:
            out.append(line)
    return b"\r\n".join(out)


def _comment_safe(text: str) -> str:
    """No CR, LF, parentheses or control characters: a client cannot break the header."""
    return "".join(c for c in text if c.isprintable() and c not in "()\\")[:200]


def _path_safe(address: str) -> bool:
    return all(c.isprintable() and c not in "<>\r\n" for c in address)

"""Delivery status notifications that mailgate generates: bounces, delay warnings, success notices.

Owns: turning per-recipient outcomes into one RFC 3464 multipart/report message (RFC 6522) with
a human-readable part, a message/delivery-status part and the original headers (or the whole
original message). Must not: touch the spool, the network or the clock (times come in as
arguments), or decide *whether* a notice is due (the engine does, from RFC 3461 NOTIFY).

RFCs: 3464 (delivery-status fields), 6522 (multipart/report), 3461 §6 (ENVID, ORCPT, RET),
3834 §5 (Auto-Submitted), 6533 (message/global-* for SMTPUTF8 originals), 5321 §4.5.5 (a DSN
is sent with the null reverse path: the engine does that when it queues the result).
"""

from __future__ import annotations

import email.utils
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from mailgate.spool.entry import Envelope

Action = Literal["failed", "delayed", "delivered", "relayed"]

# Like Postfix's bounce_size_limit: above this, a failure notice returns the headers only, so
# that a bounce of a 50 MB message does not cost another 50 MB of somebody's mailbox.
MAX_RETURNED_SIZE = 256 * 1024

_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True, slots=True)
class Notice:
    """One recipient's entry in a DSN.

    address:          the recipient as given in RCPT TO (Final-Recipient).
    action:           RFC 3464 §2.3.3 action.
    status:           RFC 3463 enhanced status ("5.1.1").
    diagnostic:       the remote reply line ("550 5.1.1 No such user") or our own diagnostic.
    remote_mta:       the host that gave `diagnostic` ("mx1.example.org"), "" if none did.
    orcpt:            RFC 3461 ORCPT as received ("rfc822;addr"), or None.
    last_attempt_at:  when the last try happened, None if there was none.
    will_retry_until: for Action: delayed, when mailgate gives up.
    """

    address: str
    action: Action
    status: str
    diagnostic: str = ""
    remote_mta: str = ""
    orcpt: str | None = None
    last_attempt_at: datetime | None = None
    will_retry_until: datetime | None = None


def status_of(reply_line: str, *, permanent: bool) -> str:
    """The enhanced status code of a reply line ("550 5.1.1 ..."), or a generic one.

    RFC 3463 §3: when the server gave no enhanced code, the class follows the reply code.
    """
    parts = reply_line.split(None, 2)
    if len(parts) >= 2 and _ENHANCED.match(parts[1]):
        return parts[1]
    if parts and parts[0][:1] in ("4", "5") and parts[0].isdigit():
        return f"{parts[0][0]}.0.0"
    return "5.0.0" if permanent else "4.0.0"


def header_section(message: bytes) -> bytes:
    """The header block of `message` with CRLF line endings, without the empty line after it."""
    normal = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    head, _, _ = normal.partition(b"\n\n")
    return head.replace(b"\n", b"\r\n") + b"\r\n"


def build(
    *,
    original: Envelope,
    message: bytes,
    notices: Sequence[Notice],
    reporting_mta: str,
    now: datetime,
    recipient: str | None = None,
    size: int | None = None,
) -> bytes:
    """The complete DSN message (CRLF line endings) to be queued from the null sender.

    `recipient` is who the DSN goes to: the original sender by default, the postmaster for a
    double bounce. The original message is returned in full only to its own sender, only for
    failures, when RET is not HDRS (RFC 3461 §4.3) and when it is at most MAX_RETURNED_SIZE;
    otherwise its headers only (always for a double bounce). `size` is the original's size
    when `message` is only its header section (a large message is not read whole for this).
    """
    if not notices:
        raise ValueError("a DSN needs at least one recipient notice")
    to = recipient if recipient is not None else original.mail_from
    actions = {n.action for n in notices}
    subject = _subject(actions)
    is_global = original.smtputf8
    # The original goes back in full only to its own sender: a double bounce tells the
    # postmaster what failed, never what someone else wrote (issue #11).
    is_own_sender = recipient is None or recipient == original.mail_from
    full = (
        is_own_sender
        and "failed" in actions
        and original.ret != "HDRS"
        and (len(message) if size is None else size) <= MAX_RETURNED_SIZE
    )
    boundary = f"{secrets.token_hex(8)}/{_clean(reporting_mta)}"
    msgid = f"<{secrets.token_hex(12)}@{_clean(reporting_mta)}>"

    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{_clean(reporting_mta)}>",
        f"To: <{_clean(to)}>",
        f"Subject: {subject}",
        f"Date: {email.utils.format_datetime(now)}",
        f"Message-ID: {msgid}",
        # RFC 3834 §5: so that vacation responders and the like never answer a DSN.
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
    ]
    original_id = _header_value(header_section(message), b"message-id")
    if original_id and re.fullmatch(r"<[^<>\s]+>", original_id):
        head.append(f"In-Reply-To: {original_id}")
        head.append(f"References: {original_id}")
    if is_global or _has_8bit(message):
        head.append("Content-Transfer-Encoding: 8bit")

    parts: list[bytes] = []
    parts.append(
        _part(
            "text/plain; charset=us-ascii",
            _human_text(original, notices, reporting_mta).encode("ascii", "replace"),
            description="Notification",
        )
    )
    status_type = "message/global-delivery-status" if is_global else "message/delivery-status"
    parts.append(
        _part(
            status_type,
            _delivery_status(original, notices, reporting_mta, now),
            description="Delivery report",
        )
    )
    if full:
        kind = "message/global" if is_global else "message/rfc822"
        body = _crlf(message)
        parts.append(
            _part(
                kind,
                body,
                description="Undelivered Message",
                cte="8bit" if _has_8bit(body) else "7bit",
            )
        )
    else:
        kind = "message/global-headers" if is_global else "text/rfc822-headers"
        hdrs = header_section(message)
        parts.append(
            _part(
                kind, hdrs, description="Message Headers", cte="8bit" if _has_8bit(hdrs) else "7bit"
            )
        )

    out = bytearray()
    out += "\r\n".join(head).encode("utf-8") + b"\r\n\r\n"
    out += b"This is a MIME-encapsulated message.\r\n\r\n"
    for part in parts:
        out += f"--{boundary}\r\n".encode() + part + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


def _subject(actions: set[Action]) -> str:
    if "failed" in actions:
        return "Undelivered Mail Returned to Sender"
    if "delayed" in actions:
        return "Delayed Mail (still being retried)"
    return "Successful Mail Delivery Report"


def _human_text(original: Envelope, notices: Sequence[Notice], reporting_mta: str) -> str:
    lines = [f"This is the mail system at host {_clean(reporting_mta)}.", ""]
    failed = [n for n in notices if n.action == "failed"]
    delayed = [n for n in notices if n.action == "delayed"]
    done = [n for n in notices if n.action in ("delivered", "relayed")]
    if failed:
        lines += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. It's attached below.",
            "",
            "For further assistance, please send mail to postmaster.",
            "",
        ]
    if delayed:
        lines += [
            "Your message could not be delivered yet to the recipients below.",
            "Delivery will be retried; you do not have to resend the message.",
        ]
        until = max((n.will_retry_until for n in delayed if n.will_retry_until), default=None)
        if until is not None:
            until_text = email.utils.format_datetime(until)
            lines.append(f"Delivery attempts will continue until {until_text}.")
        lines.append("")
    if done:
        lines += ["Your message was successfully delivered to the destination(s) below.", ""]
    for n in notices:
        where = f"host {_clean(n.remote_mta)} said: " if n.remote_mta else ""
        lines.append(f"<{_clean(n.address)}>: {where}{_clean(n.diagnostic) or n.status}")
    lines.append("")
    return "\r\n".join(_wrap(line) for line in lines)


def _delivery_status(
    original: Envelope, notices: Sequence[Notice], reporting_mta: str, now: datetime
) -> bytes:
    # RFC 3464 §2.2: per-message fields, then one block per recipient, blocks separated by
    # an empty line.
    blocks: list[list[str]] = []
    per_message = [f"Reporting-MTA: dns; {_clean(reporting_mta)}"]
    if original.envid is not None:
        # RFC 3461 §6.3: Original-Envelope-Id must be returned when ENVID was given.
        per_message.append(f"Original-Envelope-Id: {_clean(original.envid)}")
    per_message.append(f"Arrival-Date: {email.utils.format_datetime(original.received_at)}")
    blocks.append(per_message)
    for n in notices:
        block: list[str] = []
        if n.orcpt:
            block.append(f"Original-Recipient: {_clean(n.orcpt)}")
        block.append(f"Final-Recipient: rfc822; {_clean(n.address)}")
        block.append(f"Action: {n.action}")
        block.append(f"Status: {n.status}")
        if n.remote_mta:
            block.append(f"Remote-MTA: dns; {_clean(n.remote_mta)}")
        if n.diagnostic:
            # RFC 3464 §2.3.6: "smtp" when the text is an SMTP reply from the remote MTA.
            kind = "smtp" if n.remote_mta else "X-mailgate"
            block.append(f"Diagnostic-Code: {kind}; {_clean(n.diagnostic)}")
        if n.last_attempt_at is not None:
            block.append(f"Last-Attempt-Date: {email.utils.format_datetime(n.last_attempt_at)}")
        if n.will_retry_until is not None:
            block.append(f"Will-Retry-Until: {email.utils.format_datetime(n.will_retry_until)}")
        blocks.append(block)
    text = "\r\n\r\n".join("\r\n".join(_wrap(f) for f in b) for b in blocks) + "\r\n"
    return text.encode("utf-8")


def _part(content_type: str, body: bytes, *, description: str, cte: str = "7bit") -> bytes:
    head = (
        f"Content-Description: {description}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Transfer-Encoding: {cte}\r\n\r\n"
    )
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return head.encode() + body


def _crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def _has_8bit(data: bytes) -> bool:
    return not data.isascii()


def _header_value(headers: bytes, name: bytes) -> str | None:
    """The unfolded value of the first header `name` (lower case), or None."""
    value: list[bytes] | None = None
    for line in headers.split(b"\r\n"):
        if value is not None:
            if line[:1] in (b" ", b"\t"):
                value.append(line.strip())
                continue
            break
        key, sep, rest = line.partition(b":")
        if sep and key.strip().lower() == name:
            value = [rest.strip()]
    if value is None:
        return None
    return b" ".join(value).decode("ascii", "replace")


def _clean(text: str) -> str:
    """One line of printable text: a remote reply can never inject a header or a MIME line."""
    return "".join(ch if ch.isprintable() else " " for ch in text).strip()


def _wrap(line: str, width: int = 900) -> str:
    """Keep every line under RFC 5322 §2.1.1's 998 octets by folding long field values."""
    if len(line.encode("utf-8")) <= width:
        return line
    out: list[str] = []
    while len(line) > width:
        cut = line.rfind(" ", 0, width)
        if cut <= 0:
            cut = width
        out.append(line[:cut])
        line = " " + line[cut:].lstrip()
    out.append(line)
    return "\r\n".join(out)

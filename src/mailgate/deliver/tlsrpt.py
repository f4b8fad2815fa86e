"""SMTP TLS Reporting (RFC 8460): counting TLS sessions per policy domain and day, and the
daily aggregate report sent to the domains that ask for one.

Owns: the per-day counters (in memory, saved to `<spool>/tlsrpt/DAY.json` so that a restart
loses at most a minute), the `_smtp._tls.DOMAIN` TXT look-up, the JSON report (§4), gzip, and
the report message (§5.3: multipart/report; report-type="tlsrpt", an application/tlsrpt+gzip
part named `submitter!policy-domain!begin!end!id.json.gz`). Must not: send mail itself (the
engine queues the message through the spool like any other), or judge sessions.

Sessions are counted for domains that had a policy (MTA-STS or DANE): only those can ask for
reports, and §4.3's result types describe their failures. Only `mailto:` report addresses are
used; `https:` submission (§3) is not implemented.
"""

from __future__ import annotations

import base64
import email
import email.utils
import gzip
import json
import logging
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

log = logging.getLogger(__name__)

SAVE_INTERVAL = 60.0  # seconds between two saves of today's counters
MAX_FAILURE_DETAILS = 100  # distinct failure rows kept per policy and day
MAX_DOMAINS_PER_DAY = 10000  # policy domains counted per day (memory bound)


@dataclass(frozen=True, slots=True)
class Session:
    """One TLS session (or attempt) with an MX host of a domain that has a policy.

    policy_type:   "sts" or "tlsa" (RFC 8460 §4.4 policy-type).
    policy_string: the policy as reported (the MTA-STS policy lines, or the TLSA records).
    result:        "" for success, else an RFC 8460 §4.3 result type.
    """

    domain: str
    policy_type: str
    policy_string: tuple[str, ...]
    mx_host: str
    receiving_ip: str
    result: str = ""
    reason: str = ""
    sending_ip: str = ""  # our address on the connection ("" when none was made)


def result_type(failure: str) -> str:
    """The RFC 8460 §4.3 result type of one of our failure texts."""
    text = failure.lower()
    if "no tls (" in text or "tls failed" in text:
        return "starttls-not-supported"
    if "no matching subjectaltname" in text or "is not for" in text:
        return "certificate-host-mismatch"
    if "not valid at validation time" in text or "expired" in text:
        return "certificate-expired"
    if "self-signed" in text or "trust" in text or "issuer" in text:
        return "certificate-not-trusted"
    if "tlsa" in text and "record matches" not in text:
        return "tlsa-invalid"
    return "validation-failure"


class Reporter:
    """Counts sessions of today; writes the reports of finished days."""

    def __init__(
        self,
        folder: Path,
        resolver: dns.asyncresolver.Resolver,
        *,
        submitter: str,
        contact: str,
    ) -> None:
        self.folder = folder
        self.resolver = resolver
        self.submitter = submitter
        self.contact = contact
        self._day: date | None = None
        self._counts: dict[str, Any] = {}
        self._dirty = False

    # --- counting --------------------------------------------------------------------------

    def record(self, session: Session, at: datetime) -> None:
        day = at.astimezone(UTC).date()
        if self._day != day:
            self.save()
            self._day = day
            self._counts = self._read(day)
        domains = self._counts.setdefault("domains", {})
        if session.domain not in domains and len(domains) >= MAX_DOMAINS_PER_DAY:
            return
        key = f"{session.policy_type}|{'|'.join(session.policy_string)}"
        policy = domains.setdefault(session.domain, {}).setdefault(
            key,
            {"type": session.policy_type, "string": list(session.policy_string),
             "mx": [], "ok": 0, "failed": 0, "details": {}},
        )  # fmt: skip
        if session.mx_host not in policy["mx"]:
            policy["mx"].append(session.mx_host)
        if not session.result:
            policy["ok"] += 1
        else:
            policy["failed"] += 1
            detail = (f"{session.result}|{session.mx_host}|{session.receiving_ip}|"
                      f"{session.sending_ip}")  # fmt: skip
            details = policy["details"]
            if detail in details or len(details) < MAX_FAILURE_DETAILS:
                row = details.setdefault(detail, {"count": 0, "reason": session.reason[:200]})
                row["count"] += 1
        self._dirty = True

    def save(self) -> None:
        """Write today's counters (atomically); cheap when nothing changed."""
        if not self._dirty or self._day is None:
            return
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.folder / f"{self._day.isoformat()}.json"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(self._counts, sort_keys=True).encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._dirty = False

    def _read(self, day: date) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(
                (self.folder / f"{day.isoformat()}.json").read_bytes()
            )
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("tlsrpt %s: counters unreadable, starting again: %s", day, e)
            return {}
        return data

    # --- reporting -------------------------------------------------------------------------

    def finished_days(self, today: date) -> list[date]:
        """Days before `today` whose counters are waiting to be reported."""
        days: list[date] = []
        if not self.folder.is_dir():
            return days
        for path in sorted(self.folder.glob("*.json")):
            try:
                day = date.fromisoformat(path.stem)
            except ValueError:
                continue
            if day < today:
                days.append(day)
        return days

    async def reports(self, day: date, now: datetime) -> list[tuple[str, list[str], bytes]]:
        """The report messages for `day`: (policy domain, mailto addresses, message bytes)."""
        if self._day == day:
            self.save()
        counts = self._read(day)
        out: list[tuple[str, list[str], bytes]] = []
        for domain, policies in sorted(counts.get("domains", {}).items()):
            addresses = await self._rua(domain)
            if not addresses:
                continue
            report = self.build(day, domain, policies)
            out.append((domain, addresses, self.message(day, domain, report, now)))
        return out

    def forget(self, day: date) -> None:
        """The day was reported: its counters go."""
        if self._day == day:
            self._counts, self._dirty = {}, False
        (self.folder / f"{day.isoformat()}.json").unlink(missing_ok=True)

    async def _rua(self, domain: str) -> list[str]:
        """mailto: addresses of the `_smtp._tls` record (RFC 8460 §3); [] when none."""
        try:
            answer = await self.resolver.resolve(f"_smtp._tls.{domain}.", "TXT")
        except dns.exception.DNSException:
            return []
        records = [
            b"".join(r.strings).decode("utf-8", "replace")
            for r in answer
            if r.rdtype == dns.rdatatype.TXT
        ]
        return parse_rua(records)

    def build(self, day: date, domain: str, policies: dict[str, Any]) -> dict[str, Any]:
        """The RFC 8460 §4 report object."""
        start = datetime.combine(day, time(0, 0), UTC)
        end = start + timedelta(days=1) - timedelta(seconds=1)
        entries = []
        for policy in policies.values():
            details = []
            for key, row in sorted(policy["details"].items()):
                result, mx_host, ip, ours = [*key.split("|"), "", "", ""][:4]
                detail = {"result-type": result, "receiving-mx-hostname": mx_host,
                          "failed-session-count": row["count"]}  # fmt: skip
                if ip:
                    detail["receiving-ip"] = ip
                if ours:
                    detail["sending-mta-ip"] = ours
                if row["reason"]:
                    detail["failure-reason-code"] = row["reason"]
                details.append(detail)
            entries.append(
                {
                    "policy": {
                        "policy-type": policy["type"],
                        "policy-string": policy["string"],
                        "policy-domain": domain,
                        "mx-host": policy["mx"],
                    },
                    "summary": {
                        "total-successful-session-count": policy["ok"],
                        "total-failure-session-count": policy["failed"],
                    },
                    "failure-details": details,
                }
            )
        return {
            "organization-name": self.submitter,
            "date-range": {"start-datetime": _stamp(start), "end-datetime": _stamp(end)},
            "contact-info": self.contact,
            "report-id": f"{day.isoformat()}.{domain}.{secrets.token_hex(4)}@{self.submitter}",
            "policies": entries,
        }

    def message(self, day: date, domain: str, report: dict[str, Any], now: datetime) -> bytes:
        """RFC 8460 §5.3: the report as a gzip attachment of a multipart/report message."""
        start = datetime.combine(day, time(0, 0), UTC)
        end = start + timedelta(days=1)
        unique = secrets.token_hex(6)
        filename = (f"{self.submitter}!{domain}!{int(start.timestamp())}!"
                    f"{int(end.timestamp())}!{unique}.json.gz")  # fmt: skip
        body = gzip.compress(json.dumps(report, indent=1).encode(), mtime=0)
        boundary = f"tlsrpt-{unique}"
        b64 = _base64_lines(body)
        head = [
            f"From: TLS Reporting <noreply-smtp-tls-reporting@{self.submitter}>",
            f"Date: {email.utils.format_datetime(now)}",
            f"Subject: Report Domain: {domain} Submitter: {self.submitter} "
            f"Report-ID: <{report['report-id']}>",
            f"Message-ID: <{unique}.tlsrpt@{self.submitter}>",
            f"TLS-Report-Domain: {domain}",
            f"TLS-Report-Submitter: {self.submitter}",
            "Auto-Submitted: auto-generated",
            "MIME-Version: 1.0",
            f'Content-Type: multipart/report; report-type="tlsrpt"; boundary="{boundary}"',
        ]
        text = (f"This is an aggregate TLS report from {self.submitter} for {domain}, "
                f"{day.isoformat()} (RFC 8460).")  # fmt: skip
        parts = [
            f"--{boundary}",
            "Content-Type: text/plain; charset=us-ascii",
            "Content-Transfer-Encoding: 7bit",
            "",
            text,
            "",
            f"--{boundary}",
            "Content-Type: application/tlsrpt+gzip",
            "Content-Transfer-Encoding: base64",
            f'Content-Disposition: attachment; filename="{filename}"',
            "",
            *b64,
            "",
            f"--{boundary}--",
            "",
        ]
        return ("\r\n".join(head) + "\r\n\r\n" + "\r\n".join(parts)).encode("ascii")


def parse_rua(records: list[str]) -> list[str]:
    """mailto: addresses from `_smtp._tls` TXT strings (RFC 8460 §3): exactly one TLSRPTv1
    record; `rua` is a comma-separated list of URIs."""
    found = [r for r in records if r.strip().startswith("v=TLSRPTv1")]
    if len(found) != 1:
        return []
    addresses: list[str] = []
    for part in found[0].split(";"):
        key, sep, value = part.strip().partition("=")
        if not sep or key.strip() != "rua":
            continue
        for uri in value.split(","):
            uri = uri.strip()
            if uri.lower().startswith("mailto:"):
                address = uri[7:].split("?", 1)[0]
                if "@" in address and all(c not in address for c in "<> \t"):
                    addresses.append(address)
    return addresses


def parse_report(message: bytes) -> dict[str, Any]:
    """The JSON report inside a report message (the inverse of `Reporter.message`)."""
    parsed = email.message_from_bytes(message)
    for part in parsed.walk():
        if part.get_content_type() == "application/tlsrpt+gzip":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            data: dict[str, Any] = json.loads(gzip.decompress(payload))
            return data
    raise ValueError("no application/tlsrpt+gzip part")


def _stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def _base64_lines(data: bytes) -> list[str]:
    text = base64.b64encode(data).decode("ascii")
    return [text[i : i + 76] for i in range(0, len(text), 76)]

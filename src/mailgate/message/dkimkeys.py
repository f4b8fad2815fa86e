"""DKIM keys of managed domains: making them, storing them, and the DNS records to publish.

Owns: key generation (RSA-2048 by default, Ed25519 on request), the key files under
``<data>/dkim/<domain>/<selector>.key`` (0600, folders 0700), moving keys aside to
``dkim/removed/`` (never deleting them), selector naming, the text of the DNS records an
operator pastes into a zone file (DKIM, SPF and DMARC suggestions, submission SRV records,
MTA-STS hints), and comparing what DNS publishes with what we expect (``check_records``, fed
by a lookup callable so that it needs no network).

Must not: sign messages (that is ``message.dkim``), touch the directory (the CLI wires that),
log or print private key material, or perform DNS queries itself.

RFCs: 6376 §3.6.1 (key record tags), §3.6.2.2 (TXT strings), 8301 (RSA keys of at least
1024 bits, 2048 recommended), 8463 (Ed25519 keys: raw 32-byte public key in p=), 1035 §3.3.14
(a TXT character-string holds at most 255 octets), 7208 (SPF), 7489 (DMARC), 6186 (SRV for
submission), 8314 §5.1 (_submissions._tcp), 8461 (MTA-STS), 8460 (TLS-RPT).
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailgate.dnsname import MANAGED_DOMAIN_LABELS, dkim_selector, domain_name
from mailgate.errors import MailgateError
from mailgate.netaddr import in_networks
from mailgate.values import DkimKey, Domain

ALGORITHM_RSA = "rsa-sha256"
ALGORITHM_ED25519 = "ed25519-sha256"
ALGORITHMS = (ALGORITHM_RSA, ALGORITHM_ED25519)
# RFC 8301 §3.2: signers MUST use at least 1024 bits and SHOULD use at least 2048.
RSA_BITS = 2048
DNS_TTL = 3600
TXT_STRING_MAX = 255  # RFC 1035 §3.3.14: one length octet per character-string

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

# A single label, so never a managed domain's folder (check_domain_name wants two or more).
_REMOVED = "removed"


class DkimError(MailgateError):
    """A DKIM key or domain name problem, one line, never containing key material."""


# --- names ----------------------------------------------------------------------------


def check_domain_name(name: str) -> str:
    """The managed domain in canonical form (lower case, no trailing dot), or DkimError.

    The name becomes a folder name under ``dkim/``, so this check (dnsname.domain_name with
    two labels or more) is also what keeps a crafted name (``../x``) from escaping that folder.
    """
    canonical = domain_name(name.strip(), min_labels=MANAGED_DOMAIN_LABELS)
    if canonical is None:
        raise DkimError(f"{name!r} is not a valid domain name (use the ASCII form, xn--...)")
    return canonical


def check_selector(selector: str) -> str:
    """The selector in canonical form (dnsname.dkim_selector: dotted selectors are valid), or
    DkimError. It becomes a file name, ``<selector>.key``: the rule admits no ``/``."""
    canonical = dkim_selector(selector)
    if canonical is None:
        raise DkimError(f"{selector!r} is not a valid DKIM selector")
    return canonical


def new_selectors(taken: Collection[str], algorithms: Iterable[str], today: date) -> dict[str, str]:
    """One fresh selector per algorithm, named by the date so that keys can rotate.

    ``mg20261128`` (RSA) and ``mg20261128-ed`` (Ed25519); a second rotation on the same day
    gives ``mg20261128-2`` and ``mg20261128-2-ed``. The algorithms share the stem so that the
    keys made together are easy to recognise in the zone file.
    """
    base = f"mg{today:%Y%m%d}"
    wanted = list(algorithms)
    for n in range(1, 100):
        stem = base if n == 1 else f"{base}-{n}"
        chosen = {alg: stem + ("-ed" if alg == ALGORITHM_ED25519 else "") for alg in wanted}
        if not set(chosen.values()) & set(taken):
            return chosen
    raise DkimError(f"too many DKIM keys made on {today.isoformat()}; try again tomorrow")


# --- key files ---------------------------------------------------------------------------


def key_dir(base_dir: Path, domain: str) -> Path:
    return base_dir / "dkim" / check_domain_name(domain)


def _make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask; the key folder must be 0700


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_key(base_dir: Path, domain: str, selector: str, algorithm: str) -> DkimKey:
    """Make a key, write it to ``<base_dir>/dkim/<domain>/<selector>.key`` and describe it.

    The file is created with O_EXCL (an existing key is never overwritten) and mode 0600,
    written and fsynced before the directory learns of it.
    """
    check_selector(selector)
    private: PrivateKey
    if algorithm == ALGORITHM_RSA:
        # 65537: the public exponent every implementation expects (RFC 8017 recommends it).
        private = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,  # PKCS#1: what opendkim also reads
            serialization.NoEncryption(),
        )
    elif algorithm == ALGORITHM_ED25519:
        private = ed25519.Ed25519PrivateKey.generate()
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    else:
        raise DkimError(f"unknown DKIM algorithm {algorithm!r}")
    folder = key_dir(base_dir, domain)
    _make_private_dir(folder.parent)
    _make_private_dir(folder)
    path = folder / f"{selector}.key"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise DkimError(f"{path}: key file already exists") from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(folder)
    return DkimKey(
        selector=selector,
        algorithm=algorithm,
        key_path=path.absolute(),
        public_key_b64=public_key_b64(private),
        active=True,
    )


def load_private_key(path: Path) -> PrivateKey:
    """Read a key file; DkimError names the file, never its content."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DkimError(f"{path}: cannot read DKIM key: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise DkimError(f"{path}: not a PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise DkimError(f"{path}: neither an RSA nor an Ed25519 key")
    return key


def public_key_b64(private: PrivateKey) -> str:
    """The p= value: SubjectPublicKeyInfo for RSA (RFC 6376 §3.6.1), raw 32 octets for
    Ed25519 (RFC 8463 §4.2)."""
    if isinstance(private, rsa.RSAPrivateKey):
        der = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(der).decode("ascii")
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return base64.b64encode(raw).decode("ascii")


def set_aside(
    base_dir: Path, domain: str, selector: str | None = None, *, key_paths: Iterable[Path] = ()
) -> Path | None:
    """Move a domain's key folder (or one key file) to ``dkim/removed/``; never delete keys.

    The one way keys are set aside (``domain remove``, ``domain remove-key``, a failed ``domain
    add``). For a whole domain, `key_paths` (its key rows' files) that lie elsewhere under
    ``dkim/`` move too; files outside ``dkim/`` are the operator's and stay. An operator who
    removed a domain by mistake can move the folder back. Returns the folder's (or the key
    file's) new location, or None when it was not there.
    """
    folder = key_dir(base_dir, domain)
    stem = check_domain_name(domain)
    if selector is not None:
        selector = check_selector(selector)
        return _move_aside(base_dir, folder / f"{selector}.key", f"{stem}-{selector}")
    dkim_dir = (base_dir / "dkim").absolute()
    removed = dkim_dir / _REMOVED
    for path in key_paths:
        path = path.absolute()
        if (
            path.is_file()
            and path.is_relative_to(dkim_dir)
            and not path.is_relative_to(removed)
            and not path.is_relative_to(folder.absolute())
        ):
            _move_aside(base_dir, path, f"{stem}-{path.stem}")
    return _move_aside(base_dir, folder, stem)


def _move_aside(base_dir: Path, source: Path, stem: str) -> Path | None:
    """`source` renamed to ``dkim/removed/<stem>-<UTC time>[-n]`` (a key file keeps ``.key``)."""
    if not source.exists():
        return None
    suffix = source.suffix if source.is_file() else ""
    removed = base_dir / "dkim" / _REMOVED
    _make_private_dir(removed)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 1000):
        target = removed / (f"{stem}-{stamp}" + (f"-{n}" if n > 1 else "") + suffix)
        if not target.exists():
            os.rename(source, target)
            _fsync_dir(removed)
            return target
    raise DkimError(f"{removed}: cannot find a free name to set {source.name} aside")


# --- DNS records ---------------------------------------------------------------------------


def dkim_txt_value(key: DkimKey) -> str:
    """RFC 6376 §3.6.1 key record text; k=ed25519 per RFC 8463 §4.2."""
    kind = "ed25519" if key.algorithm == ALGORITHM_ED25519 else "rsa"
    return f"v=DKIM1; k={kind}; p={key.public_key_b64}"


def txt_strings(value: str) -> tuple[str, ...]:
    """Split TXT text into character-strings of at most 255 octets (RFC 1035 §3.3.14).

    A DKIM verifier concatenates them without separators (RFC 6376 §3.6.2.2), so a split in
    the middle of the key is harmless. Our values are ASCII, so characters are octets.
    """
    data = value.encode("ascii")
    if not data:
        return ("",)
    return tuple(
        data[i : i + TXT_STRING_MAX].decode("ascii") for i in range(0, len(data), TXT_STRING_MAX)
    )


@dataclass(frozen=True, slots=True)
class DnsRecord:
    """One resource record to publish.

    name:    absolute owner name with the trailing dot ("mg20261128._domainkey.example.org.").
    rtype:   "TXT", "SRV" or "CNAME".
    value:   TXT: the text (strings joined); SRV: "priority weight port target.";
             CNAME: "target.".
    purpose: "dkim", "spf", "dmarc", "submission-srv", "autoconfig" (mail programs' set-up).
    comment: one line explaining the record, printed above it as a zone-file comment.
    selector: the DKIM selector, for purpose "dkim".
    active:  for a DKIM key: mail is being signed with it (False: retired, still published).
    """

    name: str
    rtype: str
    value: str
    purpose: str
    comment: str = ""
    selector: str = ""
    active: bool = True
    ttl: int = DNS_TTL

    def rdata(self) -> str:
        """The record data in zone-file presentation form."""
        if self.rtype == "TXT":
            return " ".join(_quote(s) for s in txt_strings(self.value))
        return self.value

    def zone_line(self) -> str:
        return f"{self.name} {self.ttl} IN {self.rtype} {self.rdata()}"

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "name": self.name,
            "type": self.rtype,
            "ttl": self.ttl,
            "value": self.value,
            "purpose": self.purpose,
        }
        if self.rtype == "TXT":
            out["strings"] = list(txt_strings(self.value))
        if self.purpose == "dkim":
            out["selector"] = self.selector
            out["active"] = self.active
        return out


def _quote(text: str) -> str:
    # Zone-file quoting: a backslash and a double quote are escaped (RFC 1035 §5.1).
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def spf_value(hostname: str) -> str:
    # Names the gateway by its hostname. An operator with several outbound IPs (or a NAT)
    # would list them instead, e.g. "v=spf1 ip4:192.0.2.0/28 ip6:2001:db8::/64 ~all".
    # ~all (softfail) rather than -all: the domain may still have other senders to list.
    return f"v=spf1 a:{hostname} ~all"


def dmarc_value(domain: str) -> str:
    # Start with p=none and read the aggregate reports; move to quarantine/reject once every
    # sender of the domain is signed. The report address is a placeholder to adjust.
    return f"v=DMARC1; p=none; rua=mailto:postmaster@{domain}"


def dns_records(
    domain: Domain,
    *,
    hostname: str,
    submission_port: int | None = 587,
    submissions_port: int | None = 465,
    web_host: str | None = None,
    web_https_port: int | None = None,
) -> list[DnsRecord]:
    """Every record an operator should publish for a managed domain, in zone-file order.

    web_host: the host serving `[web] listen`, when it is configured: autoconfig.DOMAIN and
    autodiscover.DOMAIN point at it, and with HTTPS (web_https_port) so does Outlook's
    _autodiscover._tcp SRV record (Outlook follows it over HTTPS only)."""
    name = check_domain_name(domain.name)
    records: list[DnsRecord] = []
    for key in domain.keys:
        state = "signing" if key.active else "retired: keep published until removed"
        records.append(
            DnsRecord(
                name=f"{key.selector}._domainkey.{name}.",
                rtype="TXT",
                value=dkim_txt_value(key),
                purpose="dkim",
                comment=f"DKIM key {key.selector} ({key.algorithm}, {state})",
                selector=key.selector,
                active=key.active,
            )
        )
    records.append(
        DnsRecord(
            name=f"{name}.",
            rtype="TXT",
            value=spf_value(hostname),
            purpose="spf",
            comment=f"SPF suggestion: authorises {hostname}; merge with an existing v=spf1 record",
        )
    )
    records.append(
        DnsRecord(
            name=f"_dmarc.{name}.",
            rtype="TXT",
            value=dmarc_value(name),
            purpose="dmarc",
            comment="DMARC suggestion: monitor with p=none first, then tighten",
        )
    )
    for service, port in (("submission", submission_port), ("submissions", submissions_port)):
        # RFC 6186 §3: a target of "." says the service is not offered.
        value = f"0 1 {port} {hostname}." if port else "0 0 0 ."
        records.append(
            DnsRecord(
                name=f"_{service}._tcp.{name}.",
                rtype="SRV",
                value=value,
                purpose="submission-srv",
                comment=f"RFC 6186 SRV: mail clients find the {service} service",
            )
        )
    if web_host:
        for label, who in (("autoconfig", "Thunderbird"), ("autodiscover", "Outlook")):
            records.append(
                DnsRecord(
                    name=f"{label}.{name}.",
                    rtype="CNAME",
                    value=f"{web_host}.",
                    purpose="autoconfig",
                    comment=f"{who} sets itself up from http(s)://{label}.{name}/ ([web] listen)",
                )
            )
        if web_https_port:
            records.append(
                DnsRecord(
                    name=f"_autodiscover._tcp.{name}.",
                    rtype="SRV",
                    value=f"0 0 {web_https_port} {web_host}.",
                    purpose="autoconfig",
                    comment="Outlook's autodiscover by SRV (HTTPS only)",
                )
            )
    return records


def mta_sts_hints(domain: str) -> list[str]:
    """MTA-STS and TLS-RPT protect mail *to* the domain, whose MX is not mailgate, so these
    are hints (comments), not records to paste as they are."""
    name = check_domain_name(domain)
    today = datetime.now(UTC).strftime("%Y%m%d")
    return [
        "MTA-STS (RFC 8461), if the domain receives mail: serve",
        f"  https://mta-sts.{name}/.well-known/mta-sts.txt containing",
        "  'version: STSv1' 'mode: testing' 'mx: <each MX host>' 'max_age: 86400'",
        f'  and publish: _mta-sts.{name}. {DNS_TTL} IN TXT "v=STSv1; id={today}01"',
        f"TLS-RPT (RFC 8460): _smtp._tls.{name}. {DNS_TTL} IN TXT "
        f'"v=TLSRPTv1; rua=mailto:postmaster@{name}"',
    ]


def render_zone(domain: str, records: Iterable[DnsRecord], hints: Iterable[str]) -> str:
    """Zone-file text: each record preceded by a comment; hints as comments at the end."""
    lines = [f"; DNS records for {check_domain_name(domain)} (generated by mailgate)"]
    for record in records:
        lines.append(f"; {record.comment}" if record.comment else ";")
        lines.append(record.zone_line())
    lines.extend(f"; {hint}" for hint in hints)
    return "\n".join(lines) + "\n"


# --- checking what DNS publishes ------------------------------------------------------------


class LookupFailed(Exception):
    """A DNS lookup gave no answer (timeout, SERVFAIL): we cannot say missing or present."""


# lookup(name, rtype) -> record texts: TXT strings joined per record; SRV in presentation
# form. An empty list means NXDOMAIN or no records of that type.
Lookup = Callable[[str, str], list[str]]

Status = Literal["ok", "missing", "wrong", "unknown"]


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One line of `mailgate domain check`.

    status:   ok, missing, wrong, or unknown (the lookup failed).
    what:     "DKIM", "SPF", "DMARC", "SRV".
    name:     the DNS name looked up.
    detail:   one sentence for the operator.
    required: counts towards the exit status (SRV records are advice only).
    """

    status: Status
    what: str
    name: str
    detail: str
    required: bool = True

    def line(self) -> str:
        label = "ok" if self.status == "ok" else self.status.upper()
        return f"{label:<8} {self.what:<6} {self.name}: {self.detail}"

    def to_json(self) -> dict[str, object]:
        return {
            "status": self.status,
            "what": self.what,
            "name": self.name,
            "detail": self.detail,
            "required": self.required,
        }


def _tags(text: str) -> dict[str, str]:
    """RFC 6376 §3.2 tag-list, leniently: whitespace inside values is removed (p= may be
    split by the publisher's tooling)."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags[key.strip().lower()] = re.sub(r"\s+", "", value)
    return tags


def _lookup(lookup: Lookup, name: str, rtype: str) -> list[str] | None:
    try:
        return lookup(name, rtype)
    except LookupFailed:
        return None


def check_records(domain: Domain, *, hostname: str, lookup: Lookup) -> list[CheckResult]:
    """Compare DNS with what `dns_records` suggests; one result per record."""
    name = check_domain_name(domain.name)
    results = [_check_dkim(name, key, lookup) for key in domain.keys]
    results.append(_check_spf(name, hostname, lookup))
    results.append(_check_dmarc(name, lookup))
    expected = {r.name: r for r in dns_records(domain, hostname=hostname)}
    for srv_name in (f"_submission._tcp.{name}.", f"_submissions._tcp.{name}."):
        results.append(_check_srv(srv_name, hostname, expected[srv_name], lookup))
    return results


def _check_dkim(domain: str, key: DkimKey, lookup: Lookup) -> CheckResult:
    name = f"{key.selector}._domainkey.{domain}"
    texts = _lookup(lookup, name, "TXT")
    if texts is None:
        return CheckResult("unknown", "DKIM", name, "DNS lookup failed (timeout or SERVFAIL)")
    retired = "" if key.active else " (retired key)"
    records = [_tags(t) for t in texts if "p=" in t]
    if not records:
        return CheckResult("missing", "DKIM", name, f"no DKIM key record{retired}; publish it")
    if len(records) > 1:
        return CheckResult("wrong", "DKIM", name, "several key records at one selector")
    tags = records[0]
    want_k = "ed25519" if key.algorithm == ALGORITHM_ED25519 else "rsa"
    if tags.get("v", "DKIM1") != "DKIM1":
        return CheckResult("wrong", "DKIM", name, f"v={tags['v']}, expected v=DKIM1")
    if not tags.get("p"):
        return CheckResult("wrong", "DKIM", name, "p= is empty (the key is revoked)")
    if tags.get("k", "rsa") != want_k:
        return CheckResult("wrong", "DKIM", name, f"k={tags.get('k', 'rsa')}, expected {want_k}")
    if tags["p"] != key.public_key_b64:
        return CheckResult("wrong", "DKIM", name, f"public key mismatch{retired}; republish it")
    return CheckResult("ok", "DKIM", name, f"published, key matches{retired}")


_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _our_addresses(hostname: str, lookup: Lookup) -> list[_Address]:
    found: list[_Address] = []
    for rtype in ("A", "AAAA"):
        for text in _lookup(lookup, hostname, rtype) or []:
            try:
                found.append(ipaddress.ip_address(text))
            except ValueError:
                continue
    return found


def _spf_names_us(record: str, hostname: str, lookup: Lookup) -> bool:
    """True when a mechanism with a pass qualifier names our hostname or covers its address.

    This does not evaluate include: chains (RFC 7208 §5.2): an operator who authorises us
    through another domain's record gets "wrong" and can judge for themselves.
    """
    host = hostname.lower().rstrip(".")
    addresses: list[_Address] | None = None
    for term in record.split()[1:]:
        if term[:1] in "-~?":
            continue  # not a pass: it does not authorise anyone
        term = term.lstrip("+").lower()
        mech, _, arg = term.partition(":")
        arg = arg.split("/", 1)[0].rstrip(".") if mech in ("a", "mx") else arg
        if mech in ("a", "mx", "include", "exists") and arg == host:
            return True
        if mech in ("ip4", "ip6") and arg:
            if addresses is None:
                addresses = _our_addresses(host, lookup)
            try:
                network = ipaddress.ip_network(arg, strict=False)
            except ValueError:
                continue
            if any(in_networks(a, [network]) for a in addresses):
                return True
    return False


def _check_spf(domain: str, hostname: str, lookup: Lookup) -> CheckResult:
    texts = _lookup(lookup, domain, "TXT")
    if texts is None:
        return CheckResult("unknown", "SPF", domain, "DNS lookup failed (timeout or SERVFAIL)")
    spf = [t for t in texts if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]
    if not spf:
        suggestion = f'no SPF record; suggest "{spf_value(hostname)}"'
        return CheckResult("missing", "SPF", domain, suggestion)
    if len(spf) > 1:
        # RFC 7208 §4.5: more than one record is a permerror.
        return CheckResult("wrong", "SPF", domain, "several v=spf1 records (permerror); merge them")
    if not _spf_names_us(spf[0], hostname, lookup):
        return CheckResult("wrong", "SPF", domain, f'"{spf[0]}" does not include {hostname}')
    return CheckResult("ok", "SPF", domain, f'"{spf[0]}" includes {hostname}')


def _check_dmarc(domain: str, lookup: Lookup) -> CheckResult:
    name = f"_dmarc.{domain}"
    texts = _lookup(lookup, name, "TXT")
    if texts is None:
        return CheckResult("unknown", "DMARC", name, "DNS lookup failed (timeout or SERVFAIL)")
    # RFC 7489 §6.4: the record must begin with the v=DMARC1 tag.
    dmarc = [t for t in texts if re.match(r"\s*v\s*=\s*DMARC1\s*(;|$)", t)]
    if not dmarc:
        suggestion = f'no DMARC record; suggest "{dmarc_value(domain)}"'
        return CheckResult("missing", "DMARC", name, suggestion)
    if len(dmarc) > 1:
        # RFC 7489 §6.6.3: several records mean no DMARC policy at all.
        return CheckResult("wrong", "DMARC", name, "several v=DMARC1 records; keep one")
    policy = _tags(dmarc[0]).get("p", "")
    if policy not in ("none", "quarantine", "reject"):
        return CheckResult("wrong", "DMARC", name, f"p={policy or '(missing)'} is not a policy")
    return CheckResult("ok", "DMARC", name, f"published, p={policy}")


def _check_srv(name: str, hostname: str, expected: DnsRecord, lookup: Lookup) -> CheckResult:
    shown = name.rstrip(".")
    texts = _lookup(lookup, shown, "SRV")
    if texts is None:
        return CheckResult("unknown", "SRV", shown, "DNS lookup failed", required=False)
    if not texts:
        return CheckResult("missing", "SRV", shown, f"suggest SRV {expected.value}", required=False)
    want = expected.value.split()
    for text in texts:
        got = text.lower().split()
        if len(got) == 4 and got[2:] == [w.lower() for w in want[2:]]:
            return CheckResult("ok", "SRV", shown, f"published: {text}", required=False)
    return CheckResult(
        "wrong", "SRV", shown, f"{'; '.join(texts)} (expected {expected.value})", required=False
    )

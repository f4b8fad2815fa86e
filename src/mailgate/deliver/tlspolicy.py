"""Which TLS a delivery must achieve, host by host, and whether a session achieved it.

Owns: combining the operator's table (`delivery.tls.policy`), DANE (dane.py), MTA-STS
(mtasts.py), REQUIRETLS (the message's flag) and `TLS-Required: No` (the message's header)
into one `Requirement` per MX host; judging a finished TLS handshake against it; the
diagnostic replies of TLS policy failures and their status at expiry.
Must not: open connections or write the spool; the engine applies the outcome.

Precedence, highest first:
1. The operator's table entry for the recipient domain (as Postfix's smtp_tls_policy_maps):
   "may" (opportunistic; certificates checked and logged, never required), "encrypt" (TLS
   required, not authenticated), "verify" (TLS with a certificate valid for the MX host name),
   "dane" (usable TLSA records required and matched: Postfix's "dane-only"; plain DANE is
   already what `delivery.tls.dane = true` does for every domain).
2. DANE (RFC 7672): for an MX host whose MX and address records validated, usable TLSA
   records make authenticated TLS mandatory; all-unusable records make TLS mandatory. DANE
   wins over MTA-STS for that host (RFC 8461 §2).
3. MTA-STS (RFC 8461 §5): "enforce" removes MX hosts that match no `mx` pattern and requires
   TLS with a certificate valid for the MX host name; "testing" delivers as before and logs
   what would have failed.
4. Otherwise opportunistic TLS (RFC 7435); certificates are checked for the log only.

REQUIRETLS (RFC 8689 §4.2.1) adds to any of these: TLS, an authenticated certificate (DANE if
usable, else PKIX for the MX host name), and a next hop that offers REQUIRETLS; the MX host
itself must be authenticated (DNSSEC or a matching MTA-STS policy). `TLS-Required: No`
(RFC 8689 §5) makes recipient-published policies (DANE, MTA-STS) advisory; the operator's
table still applies, and it is ignored when REQUIRETLS is set (§5: REQUIRETLS wins).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Literal

import dns.asyncresolver

from mailgate.config import DeliveryConfig
from mailgate.deliver import dane
from mailgate.deliver.certs import TrustStore, describe
from mailgate.deliver.mtasts import MtaSts, Policy
from mailgate.deliver.route import RELAY_KEY, Host, Route
from mailgate.replies import Reply

PolicyName = Literal["none", "mta-sts-enforce", "mta-sts-testing", "dane", "table"]
Method = Literal["pkix", "dane"]

# RFC 3463 / RFC 5248: X.7.10 encryption needed, X.7.5 cryptographic failure, X.7.30
# REQUIRETLS support required (RFC 8689 §6.3).
ENCRYPTION_NEEDED = "4.7.10"
CRYPTO_FAILURE = "4.7.5"
REQUIRETLS_STATUS = "5.7.30"
NO_TLS = "no TLS (STARTTLS not offered or refused)"
REQUIRETLS_UNSUPPORTED = Reply(
    550, REQUIRETLS_STATUS, "REQUIRETLS support required: the next hop does not offer it"
)


def policy_failure(what: str, detail: str, *, status: str = CRYPTO_FAILURE) -> Reply:
    """A temporary failure to meet a TLS policy: `what` names the policy ("MTA-STS policy of
    example.net"), `detail` the host and the reason. It is what `queue list` shows."""
    return Reply(451, status, f"{what}: {detail}")


def expired_status(line: str) -> str | None:
    """The 5.7.x status of a TLS-policy deferral when the lifetime ends (4.7.y -> 5.7.y),
    None for any other last reply."""
    parts = line.split(None, 2)
    if (
        len(parts) == 3
        and parts[0] == "451"
        and parts[1] in (ENCRYPTION_NEEDED, CRYPTO_FAILURE)
        and _is_policy_text(parts[2])
    ):
        return "5" + parts[1][1:]
    return None


def is_own_diagnostic(line: str) -> bool:
    """Whether a reply line is one of ours (a TLS policy reply), not a remote server's."""
    parts = line.split(None, 2)
    return len(parts) == 3 and _is_policy_text(parts[2])


def _is_policy_text(text: str) -> bool:
    return text.startswith(_POLICY_PREFIXES)


_POLICY_PREFIXES = ("MTA-STS policy of ", "DANE for ", "TLS policy table for ", "REQUIRETLS ",
                    "TLS policy: ")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Requirement:
    """What the TLS session with one host must achieve.

    policy:        the log's policy= name.
    what:          the policy named for a person ("MTA-STS policy of example.net").
    needs_tls:     no STARTTLS or a failed handshake stops delivery to this host.
    needs_auth:    a certificate that fails `method` stops delivery to this host.
    method:        how the certificate is judged: PKIX for `names`, or DANE with `tlsa`.
    names:         reference identifiers (the MX host name).
    needs_requiretls: the message carries REQUIRETLS: the next hop must offer it.
    report:        (policy type, policy string) for TLS-RPT when a recipient-published
                   policy applies: ("sts", policy lines) or ("tlsa", records); else None.
    """

    policy: PolicyName = "none"
    what: str = ""
    needs_tls: bool = False
    needs_auth: bool = False
    method: Method = "pkix"
    names: tuple[str, ...] = ()
    tlsa: tuple[dane.Tlsa, ...] = ()
    needs_requiretls: bool = False
    report: tuple[str, tuple[str, ...]] | None = None

    @property
    def is_enforcing(self) -> bool:
        return self.needs_tls or self.needs_auth or self.needs_requiretls


@dataclass(frozen=True, slots=True)
class Refusal:
    """An MX host that must not be used now, and why (a TLS policy reply)."""

    host: Host | None
    reply: Reply
    policy: PolicyName
    report: tuple[str, tuple[str, ...]] | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """The hosts of a route that may be tried, each with its requirement, in order."""

    hosts: tuple[tuple[Host, Requirement], ...]
    refusals: tuple[Refusal, ...] = ()
    notes: tuple[str, ...] = field(default=())  # what a testing policy would have refused


@dataclass(frozen=True, slots=True)
class Judgement:
    """How a session measured up: `verified` (the certificate authenticated by `method`),
    `failure` ("" or why a requirement was not met), `peer` (the certificate's names)."""

    verified: bool
    failure: str
    peer: str
    would_fail: str = ""  # a check that failed but is not required (testing, may): logged


class TlsPolicy:
    """Builds per-host requirements for a destination; owns the MTA-STS cache and the trust
    store."""

    def __init__(
        self,
        cfg: DeliveryConfig,
        resolver: dns.asyncresolver.Resolver,
        *,
        dnssec: bool,
        state_folder: Path,
        now: Callable[[], datetime],
        is_refused: Callable[[str], bool] = lambda _address: False,
    ) -> None:
        self.cfg = cfg
        self.tls = cfg.tls
        self.resolver = resolver
        self.dnssec = dnssec
        self.now = now
        self.trust = TrustStore(cfg.tls.ca_file)
        self.mta_sts: MtaSts | None = None
        if cfg.tls.mta_sts:
            self.mta_sts = MtaSts(
                resolver,
                state_folder / "mta-sts",
                port=cfg.tls.mta_sts_port,
                ca_file=cfg.tls.ca_file,
                wait=min(cfg.connect_timeout, 10.0),
                now=now,
                is_refused=is_refused,
            )

    async def close(self) -> None:
        if self.mta_sts is not None:
            await self.mta_sts.close()

    async def plan(
        self, domain: str, route: Route, *, requiretls: bool = False, tls_optional: bool = False
    ) -> Plan:
        """The hosts of `route` with their requirements (see the module docstring)."""
        if domain == RELAY_KEY:
            req = Requirement("none")
            if requiretls:
                req = _with_requiretls(req, "REQUIRETLS via the relay")
            return Plan(tuple((h, _named(req, h)) for h in route.hosts))
        level = self.tls.policy.get(domain)
        if level is not None:
            return await self._table(domain, level, route, requiretls)
        advisory = tls_optional and not requiretls
        sts: Policy | None = None
        if self.mta_sts is not None and not advisory:
            sts = await self.mta_sts.policy(domain)
        hosts: list[tuple[Host, Requirement]] = []
        refusals: list[Refusal] = []
        notes: list[str] = []
        tlsa_cache: dict[str, dane.TlsaResult] = {}
        for host in route.hosts:
            req = Requirement("none")
            found = dane.TlsaResult("none")
            if self.tls.dane and self.dnssec and host.is_secure and not advisory:
                found = tlsa_cache.get(host.name) or await dane.lookup(
                    self.resolver, host.name, host.port
                )
                tlsa_cache[host.name] = found
            what_dane = f"DANE for {host.name}"
            tlsa_report = ("tlsa", tuple(_tlsa_text(r) for r in found.records))
            if found.status == "error":
                refusals.append(Refusal(host, policy_failure(what_dane, found.detail), "dane",
                                        ("tlsa", ())))  # fmt: skip
                continue
            if found.status == "usable":
                req = Requirement("dane", what_dane, True, True, "dane", tlsa=found.records,
                                  report=tlsa_report)  # fmt: skip
            elif found.status == "unusable":
                req = Requirement("dane", what_dane, needs_tls=True, report=tlsa_report)
            elif sts is not None:
                what = f"MTA-STS policy of {domain}"
                sts_report = ("sts", sts.lines())
                if not sts.allows(host.name):
                    detail = f"MX host {host.name} is not in the policy (mx: {', '.join(sts.mx)})"
                    if sts.mode == "enforce":
                        refusals.append(Refusal(host, policy_failure(what, detail),
                                                "mta-sts-enforce", sts_report))  # fmt: skip
                        continue
                    notes.append(f"{what} (testing) would refuse: {detail}")
                if sts.mode == "enforce":
                    req = Requirement("mta-sts-enforce", what, True, True, report=sts_report)
                else:
                    req = Requirement("mta-sts-testing", what, report=sts_report)
            if requiretls:
                if not (host.is_secure or (sts is not None and sts.allows(host.name))):
                    detail = (f"MX host {host.name} is authenticated neither by DNSSEC nor by "
                              f"an MTA-STS policy")  # fmt: skip
                    refusals.append(Refusal(host, _requiretls_refusal(detail), req.policy))
                    continue
                req = _with_requiretls(req, req.what or f"REQUIRETLS to {domain}")
            hosts.append((host, _named(req, host)))
        return Plan(tuple(hosts), tuple(refusals), tuple(notes))

    async def _table(self, domain: str, level: str, route: Route, requiretls: bool) -> Plan:
        what = f"TLS policy table for {domain} ({level})"
        hosts: list[tuple[Host, Requirement]] = []
        refusals: list[Refusal] = []
        for host in route.hosts:
            if level == "may":
                req = Requirement("table", what)
            elif level == "encrypt":
                req = Requirement("table", what, needs_tls=True)
            elif level == "verify":
                req = Requirement("table", what, True, True)
            else:  # "dane": usable TLSA records are required
                found = dane.TlsaResult("none", detail="MX or address records not validated")
                if self.dnssec and host.is_secure:
                    found = await dane.lookup(self.resolver, host.name, host.port)
                if found.status != "usable":
                    detail = f"{host.name}: no usable TLSA records ({found.detail or found.status})"
                    refusals.append(Refusal(host, policy_failure(what, detail), "table"))
                    continue
                req = Requirement("table", what, True, True, "dane", tlsa=found.records)
            if requiretls:
                req = _with_requiretls(req, what)
            hosts.append((host, _named(req, host)))
        return Plan(tuple(hosts), tuple(refusals))

    def judge(self, req: Requirement, tls: bool, chain: Sequence[bytes]) -> Judgement:
        """How a session with `chain` (DER, leaf first; empty without TLS) measured up."""
        if not tls:
            return Judgement(False, NO_TLS if req.is_enforcing else "", "none")
        now = self.now()
        if req.method == "dane":
            why = dane.match(req.tlsa, chain, req.names, now)
        else:
            why = self.trust.verify(chain, req.names, now)
        peer = describe(chain)
        if not why:
            return Judgement(True, "", peer)
        if req.needs_auth or req.needs_requiretls:
            return Judgement(False, f"certificate not accepted: {why}", peer)
        would = ""
        if req.policy == "mta-sts-testing" or (req.policy == "table" and not req.needs_tls):
            # What MTA-STS testing (or the table's "may") would have refused: logged.
            would = f"{req.what}: certificate would not be accepted: {why}"
        return Judgement(False, "", peer, would_fail=would)


def _named(req: Requirement, host: Host) -> Requirement:
    """`req` with the MX host name as the reference identifier (RFC 7672 §3.2.2, RFC 8461
    §4.2: the certificate must be valid for the MX host name)."""
    return replace(req, names=(host.name,))


def _with_requiretls(req: Requirement, what: str) -> Requirement:
    return replace(req, what=what, needs_tls=True, needs_auth=True, needs_requiretls=True)


def _tlsa_text(record: dane.Tlsa) -> str:
    return f"{record.usage} {record.selector} {record.mtype} {record.data.hex()}"


def _requiretls_refusal(detail: str) -> Reply:
    return Reply(550, REQUIRETLS_STATUS, f"REQUIRETLS cannot be honoured: {detail}")


def status_for_failure(req: Requirement, failure: str, shown: str) -> Reply:
    """The reply for a host whose session did not meet `req`: `failure` as judged, `shown` the
    text for `queue list` (with the host and the peer certificate's names)."""
    status = ENCRYPTION_NEEDED if failure.startswith(NO_TLS) else CRYPTO_FAILURE
    if not req.what:
        return Reply(451, status, f"TLS policy: {shown}")
    return policy_failure(req.what, shown, status=status)

"""MTA-STS (RFC 8461): discovering, fetching, caching and parsing recipient domains' policies.

Owns: the `_mta-sts.DOMAIN` TXT look-up, the HTTPS fetch of
`https://mta-sts.DOMAIN[:mta_sts_port]/.well-known/mta-sts.txt`, the policy parser, the
on-disk cache (`<spool>/mta-sts/DOMAIN.json`, kept for `max_age`, keyed by the TXT `id`), the
background refresh, and matching MX host names against a policy's `mx` patterns.
Must not: open SMTP connections or decide how a failed check is handled (tlspolicy.py and the
engine do), or resolve names other than through the delivery resolver.

Why our own parser: the policy format is a dozen lines of "key: value" (RFC 8461 §3.2), and the
maintained implementation of these semantics, postfix-mta-sts-resolver, is a daemon (with its
own socketmap protocol, YAML configuration and DNS library) rather than a library to import.
HTTP is aiohttp's client (the same library serves the operator HTTP listener): it takes a
custom resolver, so the policy host is resolved through `delivery.nameservers` like every
other delivery look-up.

RFC 8461 §3.1 (TXT record: exactly one "v=STSv1" record with an id), §3.2 (policy fields;
max_age at most 31557600), §3.3 (HTTPS with a certificate valid for mta-sts.DOMAIN, no
redirects, 200 with text/plain only, bounded size and time), §4.1 (mx patterns: one wildcard in
the left-most label), §5.1 (cache until max_age; a changed id triggers a refresh; a failed
refresh keeps the cached policy; no TXT record but a cached policy: keep using it; refresh
proactively before expiry).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import aiohttp
import aiohttp.abc
import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from mailgate.deliver.certs import name_matches

log = logging.getLogger(__name__)

Mode = Literal["enforce", "testing", "none"]
MAX_AGE_LIMIT = 31557600  # RFC 8461 §3.2: about a year
MAX_POLICY_SIZE = 64 * 1024  # RFC 8461 §3.3 suggests 64 KiB
FETCH_TIMEOUT = 60.0  # seconds for a whole fetch that runs in the background
TXT_CACHE_TTL = 300.0  # seconds a TXT answer (or its absence) is reused
POLICY_PATH = "/.well-known/mta-sts.txt"
_ID_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")  # RFC 8461 §3.1: id = 1*32(ALPHA / DIGIT)


class PolicyError(ValueError):
    """A policy or TXT record that does not follow RFC 8461 (the text says what is wrong)."""


@dataclass(frozen=True, slots=True)
class Policy:
    """One domain's MTA-STS policy as fetched.

    id:         the TXT record's id when the policy was fetched.
    fetched_at: when it was fetched (aware UTC); it is valid until fetched_at + max_age.
    """

    domain: str
    id: str
    mode: Mode
    mx: tuple[str, ...]
    max_age: int
    fetched_at: datetime

    @property
    def expires_at(self) -> datetime:
        return self.fetched_at + timedelta(seconds=self.max_age)

    def lines(self) -> tuple[str, ...]:
        """The policy as its fields (RFC 8460 §4.4 policy-string)."""
        return ("version: STSv1", f"mode: {self.mode}", *(f"mx: {m}" for m in self.mx),
                f"max_age: {self.max_age}")  # fmt: skip

    def allows(self, host: str) -> bool:
        """Whether MX host `host` matches one of the policy's `mx` patterns (§4.1)."""
        return any(name_matches(pattern, host) for pattern in self.mx)

    def to_json(self) -> bytes:
        data = {
            "domain": self.domain,
            "id": self.id,
            "mode": self.mode,
            "mx": list(self.mx),
            "max_age": self.max_age,
            "fetched_at": self.fetched_at.isoformat(),
        }
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Policy:
        data = json.loads(raw)
        fetched_at = datetime.fromisoformat(data["fetched_at"]).astimezone(UTC)
        mode = _mode(data["mode"])
        return cls(str(data["domain"]), str(data["id"]), mode,
                   tuple(str(m) for m in data["mx"]), int(data["max_age"]),
                   fetched_at)  # fmt: skip


def parse_txt(texts: list[str]) -> str | None:
    """The policy id from the `_mta-sts` TXT strings, None when there is no valid single
    STSv1 record (§3.1: several STSv1 records mean no policy)."""
    records = [t for t in texts if t.strip().startswith("v=STSv1")]
    if len(records) != 1:
        return None
    fields: dict[str, str] = {}
    for part in records[0].split(";"):
        key, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    if fields.get("v") != "STSv1":
        return None
    policy_id = fields.get("id", "")
    return policy_id if _ID_RE.fullmatch(policy_id) else None


def parse_policy(text: str, *, domain: str, policy_id: str, fetched_at: datetime) -> Policy:
    """RFC 8461 §3.2: "key: value" lines (CRLF or LF), version STSv1, mode, max_age, one or
    more mx (except for mode none). Unknown keys are ignored; the first of a repeated
    single-valued key wins. Raises PolicyError."""
    single: dict[str, str] = {}
    mx: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"line without a colon: {line[:60]!r}")
        key, value = key.strip(), value.strip()
        if key == "mx":
            if not re.fullmatch(r"(\*\.)?[A-Za-z0-9_.-]+", value):
                raise PolicyError(f"bad mx pattern {value[:60]!r}")
            mx.append(value.lower().rstrip("."))
        else:
            single.setdefault(key, value)
    if single.get("version") != "STSv1":
        raise PolicyError("version is not STSv1")
    mode = _mode(single.get("mode"))
    age_text = single.get("max_age", "")
    if not age_text.isdigit() or len(age_text) > 10 or int(age_text) > MAX_AGE_LIMIT:
        raise PolicyError(f"bad max_age {age_text[:20]!r}")
    if mode != "none" and not mx:
        raise PolicyError("no mx pattern")
    return Policy(domain, policy_id, mode, tuple(mx), int(age_text), fetched_at)


class _Resolver(aiohttp.abc.AbstractResolver):
    """aiohttp's host resolution through the delivery resolver (delivery.nameservers)."""

    def __init__(
        self, resolver: dns.asyncresolver.Resolver, is_refused: Callable[[str], bool]
    ) -> None:
        self._resolver = resolver
        self._is_refused = is_refused

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        out: list[aiohttp.abc.ResolveResult] = []
        for rdtype, fam in (("A", socket.AF_INET), ("AAAA", socket.AF_INET6)):
            if family not in (socket.AF_UNSPEC, fam):
                continue
            try:
                answer = await self._resolver.resolve(host, rdtype)
            except dns.exception.DNSException:
                continue
            for r in answer:
                address = r.to_text()
                if self._is_refused(address):
                    continue  # smarthost.bad_nets: never fetch from inside the organisation
                out.append({"hostname": host, "host": address, "port": port, "family": fam,
                            "proto": 0, "flags": socket.AI_NUMERICHOST})  # fmt: skip
        if not out:
            raise OSError(f"{host}: no usable address")
        return out

    async def close(self) -> None:
        return None


class MtaSts:
    """Policies for recipient domains: from the disk cache, refreshed by HTTPS when the TXT id
    changes or the policy ages, never holding a delivery for longer than `wait` seconds."""

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver,
        folder: Path,
        *,
        port: int,
        ca_file: Path | None,
        wait: float,
        now: Callable[[], datetime],
        is_refused: Callable[[str], bool] = lambda _address: False,
    ) -> None:
        self.resolver = resolver
        self.folder = folder
        self.port = port
        self.ca_file = ca_file
        self.wait = wait
        self.now = now
        self._is_refused = is_refused
        self._memory: dict[str, Policy | None] = {}
        self._txt: dict[str, tuple[float, str | None]] = {}  # domain -> (until, id)
        self._fetches: dict[str, asyncio.Task[Policy | None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.last_error: dict[str, str] = {}  # domain -> why the last fetch failed (TLS-RPT)

    async def policy(self, domain: str) -> Policy | None:
        """The policy that applies to `domain` now (mode none and expired policies: None)."""
        domain = domain.lower().rstrip(".")
        cached = await self._cached(domain)
        now = self.now()
        if cached is not None and cached.expires_at <= now:
            cached = None
        txt_id = await self._txt_id(domain)
        if txt_id is None:
            # §5.1: no (valid) TXT record: a cached, unexpired policy still applies; a
            # failed look-up changes nothing either.
            return _active(cached)
        if cached is not None and cached.id == txt_id:
            age = (now - cached.fetched_at).total_seconds()
            if age > cached.max_age / 2:
                self._start_fetch(domain, txt_id)  # §5.1: refresh before it expires
            return _active(cached)
        task = self._start_fetch(domain, txt_id)
        try:
            fetched = await asyncio.wait_for(asyncio.shield(task), self.wait)
        except TimeoutError:
            log.info("mta-sts %s: policy fetch still running after %.1fs, delivering with "
                     "the %s policy", domain, self.wait,
                     "cached" if cached else "no")  # fmt: skip
            return _active(cached)
        return _active(fetched if fetched is not None else cached)

    async def close(self) -> None:
        for task in list(self._fetches.values()):
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- the TXT record --------------------------------------------------------------------

    async def _txt_id(self, domain: str) -> str | None:
        clock = time.monotonic()
        hit = self._txt.get(domain)
        if hit is not None and hit[0] > clock:
            return hit[1]
        policy_id: str | None = None
        try:
            answer = await self.resolver.resolve(f"_mta-sts.{domain}.", "TXT")
            texts = [
                b"".join(r.strings).decode("utf-8", "replace")
                for r in answer
                if r.rdtype == dns.rdatatype.TXT
            ]
            policy_id = parse_txt(texts)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            pass
        except dns.exception.DNSException as e:
            # A failed look-up is not "no policy": the cached policy (if any) still applies.
            log.info("mta-sts %s: TXT look-up failed: %s", domain, type(e).__name__)
        self._txt[domain] = (clock + TXT_CACHE_TTL, policy_id)
        return policy_id

    # --- the cache ---------------------------------------------------------------------------

    def _file(self, domain: str) -> Path:
        return self.folder / f"{domain}.json"

    async def _cached(self, domain: str) -> Policy | None:
        if domain not in self._memory:
            self._memory[domain] = await asyncio.to_thread(self._read, domain)
        return self._memory[domain]

    def _read(self, domain: str) -> Policy | None:
        try:
            return Policy.from_json(self._file(domain).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("mta-sts %s: cached policy unreadable, ignored: %s", domain, e)
            return None

    def _write(self, policy: Policy) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._file(policy.domain)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, policy.to_json())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    # --- fetching ------------------------------------------------------------------------------

    def _start_fetch(self, domain: str, policy_id: str) -> asyncio.Task[Policy | None]:
        task = self._fetches.get(domain)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._fetch(domain, policy_id))
            self._fetches[domain] = task
            task.add_done_callback(functools.partial(self._fetch_done, domain))
        return task

    def _fetch_done(self, domain: str, task: asyncio.Task[Policy | None]) -> None:
        if self._fetches.get(domain) is task:
            del self._fetches[domain]

    async def _fetch(self, domain: str, policy_id: str) -> Policy | None:
        """Fetch and store the policy; None (logged, remembered for TLS-RPT) on failure."""
        url = f"https://mta-sts.{domain}:{self.port}{POLICY_PATH}"
        try:
            text = await asyncio.wait_for(self._get(url), FETCH_TIMEOUT)
            policy = parse_policy(text, domain=domain, policy_id=policy_id,
                                  fetched_at=self.now())  # fmt: skip
        except (OSError, TimeoutError, aiohttp.ClientError, PolicyError, UnicodeDecodeError,
                ValueError) as e:  # fmt: skip
            why = _describe(e)
            self.last_error[domain] = why
            log.warning("mta-sts %s: policy fetch from %s failed: %s", domain, url, why)
            return None
        self.last_error.pop(domain, None)
        try:
            await asyncio.to_thread(self._write, policy)
        except OSError as e:
            log.error("mta-sts %s: cannot cache the policy: %s", domain, e)
        self._memory[domain] = policy
        log.info("mta-sts %s: policy id=%s mode=%s max_age=%d mx=%s", domain, policy.id,
                 policy.mode, policy.max_age, ",".join(policy.mx))  # fmt: skip
        return policy

    async def _get(self, url: str) -> str:
        session = self._client()
        # §3.3: no redirects; only 200; text/plain; bounded size.
        async with session.get(url, allow_redirects=False) as response:
            if response.status != 200:
                raise PolicyError(f"HTTP status {response.status}")
            if response.content_type != "text/plain":
                raise PolicyError(f"content type {response.content_type}")
            body = await response.content.read(MAX_POLICY_SIZE + 1)
            if len(body) > MAX_POLICY_SIZE:
                raise PolicyError("policy larger than 64 KiB")
            return body.decode("utf-8")

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            ctx = ssl.create_default_context(
                cafile=str(self.ca_file) if self.ca_file is not None else None
            )
            connector = aiohttp.TCPConnector(
                ssl=ctx, resolver=_Resolver(self.resolver, self._is_refused), limit=20
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT, sock_connect=10),
                headers={"User-Agent": "mailgate MTA-STS"},
            )
        return self._session


def _mode(value: object) -> Mode:
    if value == "enforce":
        return "enforce"
    if value == "testing":
        return "testing"
    if value == "none":
        return "none"
    raise PolicyError(f"bad mode {value!r}")


def _active(policy: Policy | None) -> Policy | None:
    return policy if policy is not None and policy.mode != "none" else None


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__

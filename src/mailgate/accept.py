"""After end-of-data: check, scan, stamp, sign, commit, and answer.

Owns: the order of the acceptance steps (read the header section once -> hop count -> author
fields and policy -> scan -> stamp -> sign -> commit), the one `HeaderSection` every step is
given (so the policy, the MIME walk and the signer read the same fields; issue #11), and the
one place where their exceptions become replies (STYLE.md §4): Rejected -> its reply;
ScannerUnavailable -> 451 4.7.1; SpoolFull -> 452 4.3.1; SpoolError and anything unexpected
-> 451 4.3.0 with the details in the log only.
Must not: talk SMTP or touch sockets; it returns a Reply and the session writes it.
"The 250 is written only after commit() returns": commit fsyncs the message and its envelope.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Protocol, TypeVar

from mailgate import metrics, replies, tracelog
from mailgate.errors import Rejected, ScannerUnavailable, SpoolError, SpoolFull
from mailgate.message import dkim, headers, stamp
from mailgate.message.authors import read_authors
from mailgate.message.headers import HeaderSection
from mailgate.message.source import MessageSource
from mailgate.policy import Policy, Sender
from mailgate.replies import Reply
from mailgate.scan import Verdict
from mailgate.spool.entry import Envelope, Recipient
from mailgate.spool.incoming import Incoming
from mailgate.values import Trace

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class Committer(Protocol):
    async def commit(self, incoming: Incoming, envelope: Envelope, prefix: bytes) -> Envelope: ...


class ScannerLike(Protocol):
    async def check(
        self,
        message: bytes | MessageSource,
        log_prefix: str = "",
        section: HeaderSection | None = None,
    ) -> Verdict: ...


class SignerLike(Protocol):
    def may_sign(self, domain: str) -> bool: ...

    def sign_section(self, section: HeaderSection, bh: bytes, domain: str) -> bytes: ...


class MailParameters(Protocol):
    """What accept reads of MAIL FROM (RFC 3461, 6152, 6531, 8689 parameters); the protocol's
    `smtp.events.MailFrom` has them, and accept needs nothing else of the protocol."""

    @property
    def ret(self) -> str | None: ...
    @property
    def envid(self) -> str | None: ...
    @property
    def smtputf8(self) -> bool: ...
    @property
    def body(self) -> str | None: ...
    @property
    def requiretls(self) -> bool: ...


class RecipientParameters(Protocol):
    """What accept reads of one RCPT TO (address and RFC 3461 parameters): what
    `smtp.events.RcptTo` has."""

    @property
    def address(self) -> str: ...
    @property
    def notify(self) -> tuple[str, ...] | None: ...
    @property
    def orcpt(self) -> str | None: ...


@dataclass(slots=True)
class Transaction:
    """One MAIL ... DATA transaction as the session saw it."""

    mail: MailParameters
    mail_from: str  # after policy (may be the user's primary address)
    rcpts: list[RecipientParameters] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SessionFacts:
    """What accept needs to know about the session (built by receive.session)."""

    session_id: str
    sender: Sender
    trace: Trace
    is_submission: bool  # RFC 6409 §8 fix-ups apply to authenticated submission only


class Acceptor:
    """Runs the acceptance steps; one per server, shared by every session."""

    def __init__(
        self,
        *,
        hostname: str,
        policy: Policy,
        committer: Committer,
        scanner: ScannerLike | None,
        signer: SignerLike | None,
        hop_limit: int,
        max_header_size: int = headers.DEFAULT_MAX_HEADER_SIZE,
        on_committed: Callable[[Envelope], None] = lambda env: None,
    ) -> None:
        self._hostname = hostname
        self._policy = policy
        self._committer = committer
        self._scanner = scanner
        self._signer = signer
        self._hop_limit = hop_limit
        self._max_header_size = max_header_size
        self._on_committed = on_committed

    async def accept(self, facts: SessionFacts, txn: Transaction, incoming: Incoming) -> Reply:
        """Accept the received message or refuse it; never raises."""
        ctx = f"sid={facts.session_id} qid={incoming.qid}"
        started = time.monotonic()
        try:
            envelope, message_id = await self._accept(facts, txn, incoming, ctx)
        except Rejected as e:
            incoming.abort()
            log.info("%s rejected reply=%r reason=%r", ctx, e.reply.line(), e.reason)
            return refused(facts, txn, incoming.qid, e.reply)
        except ScannerUnavailable as e:
            incoming.abort()
            log.warning("%s deferred scanner unavailable: %s", ctx, e)
            return refused(facts, txn, incoming.qid, replies.SCANNER_UNAVAILABLE)
        except SpoolFull as e:
            incoming.abort()
            log.error("%s deferred spool full: %s", ctx, e)
            return refused(facts, txn, incoming.qid, replies.SPOOL_FULL)
        except SpoolError as e:
            incoming.abort()
            log.error("%s deferred spool error: %s", ctx, e)
            return refused(facts, txn, incoming.qid, replies.INTERNAL_ERROR)
        except Exception:
            incoming.abort()
            log.exception("%s deferred internal error", ctx)
            return refused(facts, txn, incoming.qid, replies.INTERNAL_ERROR)
        log.info(
            "%s accepted from=<%s> nrcpt=%d size=%d login=%s service=%s client=%s",
            ctx, envelope.mail_from, len(envelope.recipients), envelope.size,
            facts.sender.login or "-", facts.sender.service, facts.sender.client_ip,
        )  # fmt: skip
        metrics.ACCEPTED.labels(facts.sender.service).inc()
        metrics.ACCEPT_SECONDS.labels(facts.sender.service).observe(time.monotonic() - started)
        tracelog.accepted(envelope.id, mail_from=envelope.mail_from,
                          rcpts=[r.address for r in envelope.recipients], size=envelope.size,
                          login=envelope.login, service=envelope.service, client=envelope.client,
                          sid=facts.session_id, message_id=message_id)  # fmt: skip
        try:
            self._on_committed(envelope)
        except Exception:  # the message is on disk: it is accepted whatever happens here
            log.exception("%s wake-up of the delivery engine failed", ctx)
        return replies.queued(envelope.id)

    async def _accept(
        self, facts: SessionFacts, txn: Transaction, incoming: Incoming, ctx: str
    ) -> tuple[Envelope, str]:
        """The committed envelope and the message's Message-ID (added here if missing).

        The message stays where the session put it (memory up to 256 KiB, else spool/tmp/):
        only its header section is read into memory (at most max_header_size), the scan and
        the body hash read it a chunk at a time, and our changes to the header section are a
        new head in front of the unchanged body (`Incoming.replace_head`): the body is never
        held in memory or copied by this process (issue #18)."""
        is_large = incoming.is_spilled  # then its readers run in threads (disk, CPU)
        # The one parse of the header section (552 5.3.4 over the limit, 554 5.6.0 malformed).
        section = await _maybe_off_loop(is_large, self._read_section, incoming)
        cut = section.body_offset  # the received bytes from here on are the body, unchanged
        if section.separated:
            head = section.raw + b"\r\n"
        elif cut < incoming.size:
            # RFC 5322 §2.1: an empty line separates the body. Readers differ on a header that
            # just stops; with the line inserted they all find the body where we did.
            head = section.raw + b"\r\n"
            section = dataclasses.replace(section, body_offset=len(head), separated=True)
        else:
            head = section.raw  # all header, no body
        incoming.replace_head(head, cut)
        received = section.count("received")
        if received >= self._hop_limit:
            raise Rejected(replies.HOP_LIMIT_EXCEEDED, f"{received} Received fields")
        try:
            authors = read_authors(section)  # 554 5.6.0 for a field it cannot read strictly
        except Rejected:
            if facts.sender.login is not None:
                raise
            authors = None  # the smart host promises no identity: such mail is just not signed
        decision = self._policy.check_identity(facts.sender, authors)

        verdict_header = b""
        if self._scanner is not None:
            verdict = await self._scanner.check(incoming, log_prefix=ctx, section=section)
            verdict_header = stamp.scanned_by(verdict.header)

        rcpts = [r.address for r in txn.rcpts]
        prefix = stamp.received(facts.trace, hostname=self._hostname, qid=incoming.qid,
                                recipients=rcpts) + verdict_header  # fmt: skip
        if decision.sender_header is not None:
            if section.has("sender"):
                # One Sender: only (RFC 5322 §3.6): ours identifies the authenticated user.
                trimmed = section.without("sender")
                incoming.replace_head(trimmed.raw + head[len(section.raw) :], cut)
                section = trimmed
            prefix += stamp.sender(decision.sender_header)
        ids = section.get_all("message-id")
        message_id = ids[0].text() if ids else ""
        if facts.is_submission:
            if not section.has("message-id"):
                added = stamp.message_id(self._hostname, incoming.qid)
                message_id = added.decode("ascii").split(":", 1)[1].strip()
                prefix += added
            if not section.has("date"):
                prefix += stamp.date()
        if decision.sign_domain and self._signer is not None:
            # Sign last, over the fields the policy read plus ours: every change is in `prefix`.
            signed = section.prepend(prefix)
            if is_large:
                signature = await asyncio.get_running_loop().run_in_executor(
                    _signing(), self._sign, signed, incoming, decision.sign_domain
                )
            else:
                signature = self._sign(signed, incoming, decision.sign_domain)
            prefix = signature + prefix

        envelope = Envelope(
            id=incoming.qid,
            mail_from=txn.mail_from,
            recipients=tuple(
                Recipient(address=r.address, notify=r.notify, orcpt=r.orcpt) for r in txn.rcpts
            ),
            service=facts.sender.service,
            login=facts.sender.login or "",
            client=facts.sender.client_ip,
            ret=txn.mail.ret,
            envid=txn.mail.envid,
            smtputf8=txn.mail.smtputf8,
            body=txn.mail.body or "",
            requiretls=txn.mail.requiretls,
        )
        return await self._committer.commit(incoming, envelope, prefix), message_id

    def _read_section(self, incoming: Incoming) -> HeaderSection:
        with incoming.open_reader() as reader:
            return headers.read(reader, limit=self._max_header_size)

    def _sign(self, section: HeaderSection, incoming: Incoming, domain: str) -> bytes:
        """The DKIM-Signature fields for the message: its body hashed a chunk at a time."""
        assert self._signer is not None
        if not self._signer.may_sign(domain):
            return b""
        bh = dkim.body_hash(incoming.chunks(len(incoming.head)))
        return self._signer.sign_section(section, bh, domain)


@cache
def _signing() -> ThreadPoolExecutor:
    """The thread that hashes large bodies and signs them, one message at a time: a body hash
    takes a CPU for a while, and must not hold one of the threads that asyncio.to_thread
    shares with short hops (reading a chunk, commits). Made on first use, after the fork."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="dkim-sign")


async def _maybe_off_loop(is_large: bool, fn: Callable[..., _T], *args: Any) -> _T:
    """`fn(*args)` in a worker thread for a large message (disk reads, CPU for megabytes),
    so that the other sessions of this worker are answered meanwhile; else right here."""
    if is_large:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def refused(facts: SessionFacts, txn: Transaction, qid: str, reply: Reply) -> Reply:
    """Count and record a message refused at the end of DATA; return `reply`."""
    service = facts.sender.service
    metrics.REFUSED.labels(service, str(reply.code)).inc()
    tracelog.rejected(qid, mail_from=txn.mail_from, rcpts=[r.address for r in txn.rcpts],
                      login=facts.sender.login or "", service=service,
                      client=facts.sender.client_ip, sid=facts.session_id,
                      reply=reply.line())  # fmt: skip
    return reply

"""After end-of-data: check, scan, stamp, sign, commit, and answer.

Owns: the order of the acceptance steps and the one place where their exceptions become
replies (STYLE.md §4): Rejected -> its reply; ScannerUnavailable -> 451 4.7.1; SpoolFull ->
452 4.3.1; SpoolError and anything unexpected -> 451 4.3.0 with the details in the log only.
Must not: talk SMTP or touch sockets; it returns a Reply and the session writes it.
"The 250 is written only after commit() returns": commit fsyncs the message and its envelope.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from mailgate import metrics, replies, tracelog
from mailgate.errors import Rejected, ScannerUnavailable, SpoolError, SpoolFull
from mailgate.message import stamp
from mailgate.policy import Policy, Sender
from mailgate.replies import Reply
from mailgate.scan import Verdict
from mailgate.smtp.events import MailFrom, RcptTo
from mailgate.spool.entry import Envelope, Recipient
from mailgate.spool.incoming import Incoming

log = logging.getLogger(__name__)


class Committer(Protocol):
    async def commit(self, incoming: Incoming, envelope: Envelope, prefix: bytes) -> Envelope: ...


class ScannerLike(Protocol):
    async def check(self, message: bytes, log_prefix: str = "") -> Verdict: ...


class SignerLike(Protocol):
    def sign(self, message: bytes, domain: str) -> bytes: ...


@dataclass(slots=True)
class Transaction:
    """One MAIL ... DATA transaction as the session saw it."""

    mail: MailFrom
    mail_from: str  # after policy (may be the user's primary address)
    rcpts: list[RcptTo] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SessionFacts:
    """What accept needs to know about the session (built by receive.session)."""

    session_id: str
    sender: Sender
    trace: stamp.Trace
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
        on_committed: Callable[[Envelope], None] = lambda env: None,
    ) -> None:
        self._hostname = hostname
        self._policy = policy
        self._committer = committer
        self._scanner = scanner
        self._signer = signer
        self._hop_limit = hop_limit
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
        """The committed envelope and the message's Message-ID (added here if missing)."""
        message = incoming.getvalue()
        summary = stamp.summarize(message)
        if summary.received_count >= self._hop_limit:
            raise Rejected(replies.HOP_LIMIT_EXCEEDED, f"{summary.received_count} Received fields")
        decision = self._policy.check_from(facts.sender, summary.from_addresses)

        verdict_header = b""
        if self._scanner is not None:
            verdict = await self._scanner.check(message, log_prefix=ctx)
            verdict_header = stamp.scanned_by(verdict.header)

        rcpts = [r.address for r in txn.rcpts]
        prefix = stamp.received(facts.trace, hostname=self._hostname, qid=incoming.qid,
                                recipients=rcpts) + verdict_header  # fmt: skip
        if decision.sender_header is not None:
            if summary.has_sender:
                # One Sender: only (RFC 5322 §3.6): ours identifies the authenticated user.
                _replace_head(incoming, message, lambda b: stamp.remove_fields(b, "sender"))
                message = incoming.getvalue()
            prefix += stamp.sender(decision.sender_header)
        message_id = summary.message_id
        if facts.is_submission:
            if not summary.has_message_id:
                added = stamp.message_id(self._hostname, incoming.qid)
                message_id = added.decode("ascii").split(":", 1)[1].strip()
                prefix += added
            if not summary.has_date:
                prefix += stamp.date()
        if decision.sign_domain and self._signer is not None:
            # Sign last: every other header change is already in `prefix`.
            prefix = self._signer.sign(prefix + message, decision.sign_domain) + prefix

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


def refused(facts: SessionFacts, txn: Transaction, qid: str, reply: Reply) -> Reply:
    """Count and record a message refused at the end of DATA; return `reply`."""
    service = facts.sender.service
    metrics.REFUSED.labels(service, str(reply.code)).inc()
    tracelog.rejected(qid, mail_from=txn.mail_from, rcpts=[r.address for r in txn.rcpts],
                      login=facts.sender.login or "", service=service,
                      client=facts.sender.client_ip, sid=facts.session_id,
                      reply=reply.line())  # fmt: skip
    return reply


def _replace_head(incoming: Incoming, message: bytes, change: Callable[[bytes], bytes]) -> None:
    head = stamp.header_block(message)
    incoming.replace(change(head) + message[len(head) :])

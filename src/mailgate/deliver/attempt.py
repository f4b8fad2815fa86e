"""One SMTP client connection to one host, and the transactions sent over it.

Owns: connecting (bounded timeouts), driving `smtp.client.ClientConnection` over an asyncio
Protocol (EHLO with the HELO fallback, opportunistic STARTTLS, one pipelined transaction per
message), the ESMTP parameters a message needs, and turning every reply or network failure into
one `RecipientResult` per recipient. Must not: parse or build SMTP itself (the machine does),
touch the spool, resolve names, decide retries or write logs about delivery outcomes (the
engine does).

Why not aiosmtplib (used until issue #7): it writes every command with its own write call and
waits for each reply before the next command, and it discards replies that arrive before it
asks, so it cannot pipeline (RFC 2920). Here MAIL, every RCPT and DATA go in one write and the
message text in a second, which halves the round trips and the system calls per message.

Timeouts are counted from the last progress (a byte received, or the server taking our
output), so a large message on a slow link does not time out while it is moving.

RFCs: 5321 §3.3 and §4.1 (the transaction, replies: 2xx ok, 4xx temporary, 5xx permanent),
§4.5.2 (dot-stuffing, done by the machine over strictly CRLF-normalised data: a bare CR or LF
in the stored bytes becomes CRLF, so mailgate is never the first hop of an SMTP smuggling
chain), 2920 (PIPELINING, when offered), 3207 (STARTTLS: the handshake accepts any certificate,
which tlspolicy.py then judges against the host's Requirement -- MTA-STS, DANE, the policy
table, REQUIRETLS (8689) -- before a transaction starts; without a requirement a failed
handshake is retried once in plaintext), 6531 (SMTPUTF8 only when offered; a message that
needs it fails with 5.6.7 when the server lacks it), 6152 (BODY=8BITMIME only when
offered), 1870 (SIZE), 3461 §4 (NOTIFY, ORCPT, RET, ENVID passed on to servers that offer
DSN, xtext).
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, Literal, cast

from mailgate.deliver.certs import peer_chain
from mailgate.deliver.route import Host
from mailgate.deliver.tlspolicy import (
    REQUIRETLS_UNSUPPORTED,
    Judgement,
    Requirement,
    status_for_failure,
)
from mailgate.replies import Reply
from mailgate.smtp.client import (
    NEED_DATA,
    ClientConnection,
    ClientEvent,
    Command,
    ConnectionClosed,
    EhloReply,
    Greeting,
    ServerReply,
    StartTlsReply,
    TextWanted,
    TransactionDone,
    to_reply,
)
from mailgate.spool.entry import Envelope, Recipient

Status = Literal["delivered", "deferred", "failed"]
_ResultFn = Callable[[str, Status, Reply | None, str], None]

SMTPUTF8_UNSUPPORTED = Reply(
    550, "5.6.7", "Message needs SMTPUTF8 but the recipient server does not offer it"
)
BAD_RECIPIENT_SYNTAX = Reply(550, "5.1.3", "Recipient address cannot be sent over SMTP")
BAD_SENDER_SYNTAX = Reply(550, "5.1.7", "Sender address cannot be sent over SMTP")

# What may not appear inside <...> on a command line (the machine refuses it too: checked here
# so that a bad address gives a result instead of an exception).
_UNSAFE_ADDRESS = re.compile(r"[\x00-\x20<>\x7f]")
_WRITE_SLICE: Final = 256 * 1024  # the most we hand the transport at once (flow control)


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """The outcome of one try for one recipient (STYLE.md §6).

    reply:       the remote reply, or our own diagnostic reply, or None.
    detail:      one line for the log and for `queue show` ("mx1[192.0.2.5]:25: refused").
    host:        where the try went, None when no host was reached.
    tls:         the transaction ran under TLS.
    dsn_passed:  the remote server offered DSN, so it now owns the NOTIFY request (RFC 3461
                 §4.1: a relaying MTA passes the request on instead of answering it).
    verified:    the server's certificate was authenticated (PKIX for the MX name, or DANE).
    policy:      the TLS policy that applied (tlspolicy.PolicyName).
    peer:        the names on the server's certificate ("" when not relevant).
    note:        what a non-enforced policy would have refused (MTA-STS testing, "may").
    """

    address: str
    status: Status
    reply: Reply | None
    detail: str
    host: Host | None = None
    tls: bool = False
    dsn_passed: bool = False
    verified: bool = False
    policy: str = "none"
    peer: str = ""
    note: str = ""

    @property
    def reply_line(self) -> str:
        """The reply as one line for history, log and DSN."""
        return self.reply.line() if self.reply is not None else self.detail


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A large message, sent from the spool a chunk at a time (never whole in memory).

    size:     its length in bytes (SIZE=).
    head:     its header section (whether it needs SMTPUTF8).
    is_ascii: no octet above 127 (else BODY=8BITMIME).
    chunks:   opens a reader over the message; each next() may read the disk, and runs in a
              worker thread.
    """

    size: int
    head: bytes
    is_ascii: bool
    chunks: Callable[[], Iterator[bytes]]


@dataclass(frozen=True, slots=True)
class Transfer:
    """One message to some of its recipients, all for one destination.

    clean_from: the offset from which the message has CR and LF only as CRLF pairs (received
                over SMTP, after its header section), so that only dot-stuffing is done there
                (smtp.data.DataEncoder); None: it is all normalised.
    """

    qid: str
    envelope: Envelope
    recipients: tuple[Recipient, ...]
    message: bytes | StoredMessage
    clean_from: int | None = None

    @property
    def size(self) -> int:
        message = self.message
        return len(message) if isinstance(message, bytes) else message.size

    @property
    def head(self) -> bytes:
        message = self.message
        return message if isinstance(message, bytes) else message.head

    @property
    def is_ascii(self) -> bool:
        message = self.message
        return message.isascii() if isinstance(message, bytes) else message.is_ascii


class ConnectFailure(Exception):
    """A host could not be used: refused, timed out, TLS failed, or its greeting/EHLO was an
    error reply (`reply`, when the server gave one)."""

    def __init__(
        self,
        host: Host,
        detail: str,
        reply: Reply | None = None,
        *,
        tls: bool = False,
        policy: str = "none",
        peer: str = "",
        verified: bool = False,
        local_address: str = "",
    ) -> None:
        super().__init__(detail)
        self.host = host
        self.detail = detail
        self.reply = reply
        self.tls = tls
        self.policy = policy
        self.peer = peer
        self.verified = verified
        self.local_address = local_address  # our end of the connection (TLS-RPT)


def reply_of(code: int, message: str) -> Reply:
    """A remote reply as a Reply: the enhanced code if the server gave one (RFC 2034), else
    the class of the reply code ("X.0.0"). `message` is the reply text, one line per line."""
    return to_reply(code, message.splitlines())


def status_of_reply(reply: Reply) -> Status:
    """RFC 5321 §4.2.1: 2xx done, 5xx permanent; 4xx and anything odd temporary."""
    if 200 <= reply.code < 300:
        return "delivered"
    if 500 <= reply.code < 600:
        return "failed"
    return "deferred"


def xtext(text: str) -> str:
    """RFC 3461 §4: "+" and "=" and anything outside "!".."~" as "+HH" (UTF-8 octets)."""
    out: list[str] = []
    for byte in text.encode("utf-8"):
        ch = chr(byte)
        out.append(f"+{byte:02X}" if byte < 33 or byte > 126 or ch in "+=" else ch)
    return "".join(out)


def orcpt_param(orcpt: str) -> str | None:
    """ORCPT=addr-type;xtext from the stored "rfc822;addr" (decoded); None if malformed."""
    kind, sep, address = orcpt.partition(";")
    if not sep or not kind or not address:
        return None
    return f"ORCPT={kind.strip()};{xtext(address.strip())}"


def header_needs_utf8(message: bytes) -> bool:
    """RFC 6532 headers: non-ASCII in the header section (the body may be 8-bit under
    8BITMIME without SMTPUTF8)."""
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[:end]
    return not head.isascii()


class _Wire(asyncio.Protocol):
    """The transport of one connection, feeding every received byte to the machine at once.

    What the machine queues is written as soon as it is queued: after a 354 the message text
    goes out from data_received(), without waking the coroutine, so one pipelined transaction
    wakes it once. The coroutine waits in next_event() only for events.
    """

    def __init__(self, machine: ClientConnection) -> None:
        self.machine = machine
        self.transport: asyncio.Transport | None = None
        self.lost = ""  # why the transport went away, "" while it is there
        self._loop = asyncio.get_running_loop()
        self._backlog: deque[bytes | memoryview] = deque()
        self._is_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._progress_at = self._loop.time()
        self._drained: asyncio.Future[None] | None = None

    # --- protocol callbacks --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._progress_at = self._loop.time()
        self.machine.receive_data(data)
        self.flush()
        if self.machine.has_events:
            self._wake()

    def eof_received(self) -> bool:
        self.lost = "connection closed by the server"
        self.machine.receive_data(b"")
        self._wake()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.lost = _describe(exc)
            self.machine.abort(self.lost)
        else:
            self.lost = self.lost or "connection closed"
            self.machine.receive_data(b"")
        self._backlog.clear()
        self._wake()
        self._wake_drained()

    def pause_writing(self) -> None:
        self._is_paused = True

    def resume_writing(self) -> None:
        self._is_paused = False
        self._progress_at = self._loop.time()  # the server is taking our output
        self._write_backlog()
        if not self._is_paused and not self._backlog:
            self._wake_drained()

    # --- the connection's side -------------------------------------------------------------
    def flush(self) -> None:
        """Write what the machine queued (in slices when the server reads slowly)."""
        out = self.machine.data_to_send()
        if not out:
            return
        transport = self.transport
        if not self._backlog and not self._is_paused and len(out) <= _WRITE_SLICE:
            if transport is not None and not transport.is_closing():
                transport.write(out)  # the usual case: one write, no copy
            return
        self._backlog.append(out)
        self._write_backlog()

    def _write_backlog(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            self._backlog.clear()
            return
        # Bounded: every pass writes one slice of the backlog or stops.
        for _ in range(sum(len(b) for b in self._backlog) // _WRITE_SLICE + len(self._backlog)):
            if not self._backlog or self._is_paused:
                return
            chunk = self._backlog[0]
            if len(chunk) <= _WRITE_SLICE:
                self._backlog.popleft()
                transport.write(chunk)
            else:
                view = memoryview(chunk)
                self._backlog[0] = view[_WRITE_SLICE:]
                transport.write(view[:_WRITE_SLICE])  # may call pause_writing()

    async def drained(self, idle_limit: float) -> None:
        """Until the transport takes more (what we queued is written or below its high-water
        mark). TimeoutError when the server takes nothing for `idle_limit` seconds;
        ConnectionError when the connection is gone."""
        for _ in range(2):  # woken by resume_writing() with nothing left, or by the close
            if self.transport is None or self.transport.is_closing() or self.lost:
                raise ConnectionError(self.lost or "connection closed")
            if not self._is_paused and not self._backlog:
                return
            self._drained = self._loop.create_future()
            try:
                async with asyncio.timeout(idle_limit):
                    await self._drained
            finally:
                self._drained = None
        if self._is_paused or self._backlog:
            raise ConnectionError(self.lost or "connection closed")

    def _wake_drained(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def next_event(self, idle_limit: float) -> ClientEvent:
        """The machine's next event, waiting for it as wait() does."""
        await self.wait(idle_limit)
        event = self.machine.next_event()
        assert event is not NEED_DATA  # wait() returned, so there is one
        return event

    async def wait(self, idle_limit: float) -> None:
        """Until the machine has an event. TimeoutError when nothing moved for `idle_limit`
        seconds (RFC 5321 §4.5.3.2: a timeout per command, here counted from the last
        progress); ConnectionError when the machine is closed and has no event left."""
        machine = self.machine
        if machine.has_events:
            return
        if machine.is_closed:
            raise ConnectionError(self.lost or "connection closed")
        loop = self._loop
        self._progress_at = loop.time()  # our command has just been written
        waiter = loop.create_future()
        self._waiter = waiter
        self._timer = loop.call_at(self._progress_at + idle_limit, self._check_time, idle_limit)
        try:
            await waiter
        finally:
            self._waiter = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if not machine.has_events:  # woken by a close that left no event (after QUIT)
            raise ConnectionError(self.lost or "connection closed")

    async def start_tls(
        self, context: ssl.SSLContext, server_hostname: str | None, handshake_timeout: float
    ) -> None:
        """Upgrade as the client (RFC 3207 §4). loop.start_tls() pauses reading at once, so
        bytes that arrive in plaintext meanwhile reach the machine only through the check it
        makes itself (RFC 3207 §5)."""
        assert self.transport is not None
        new = await self._loop.start_tls(
            self.transport,
            self,
            context,
            server_hostname=server_hostname,
            ssl_handshake_timeout=handshake_timeout,
        )
        if new is None:
            raise ConnectionError("TLS upgrade failed")
        self.transport = new

    def close(self) -> None:
        """Close after writing what is buffered."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        """Close now, dropping what is buffered (not after close(): its QUIT should go)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def _check_time(self, idle_limit: float) -> None:
        """The timer of wait(): time out, or wait on when there was progress since."""
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        due = self._progress_at + idle_limit
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._check_time, idle_limit)
        else:
            waiter.set_exception(TimeoutError())

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Connection:
    """An open SMTP session with one host, reusable for several transactions."""

    def __init__(self, host: Host, wire: _Wire, tls: bool, timeout: float) -> None:
        self.host = host
        self.tls = tls
        self.timeout = timeout
        self.transactions = 0
        # A reused connection died before the server answered MAIL: nothing of the last
        # transaction reached it, so the caller may send it again at once on a new connection.
        self.was_stale = False
        self.tls_failure = ""  # why TLS was given up on this host, for the log
        self.verified = False  # the certificate was authenticated (tlspolicy.judge)
        self.policy = "none"  # the TLS policy that applied to this host
        self.peer = ""  # the names on the server's certificate
        self.tls_note = ""  # what a non-enforced policy would have refused
        self.local_address = ""  # our address on this connection (TLS-RPT sending-mta-ip)
        self._wire = wire
        self._machine = wire.machine
        self._is_closed = False

    @property
    def is_usable(self) -> bool:
        """Ready for another transaction: not closed by us or by the server."""
        return not self._is_closed and self._machine.may(Command.TRANSACTION)

    @classmethod
    async def open(
        cls,
        host: Host,
        *,
        helo: str,
        tls_context: ssl.SSLContext | None,
        connect_timeout: float,
        command_timeout: float,
        requirement: Requirement | None = None,
        judge: Callable[[Requirement, bool, list[bytes]], Judgement] | None = None,
    ) -> Connection:
        """Connect, read the greeting, EHLO, and STARTTLS when offered (and a context is
        given). A failed TLS handshake is retried once in plaintext, as opportunistic TLS
        means "encrypt when possible", not "refuse to deliver" -- unless `requirement` needs
        TLS. With `judge`, the session is measured against `requirement` before any command
        of a transaction is sent; a requirement that is not met ends it with QUIT and a
        ConnectFailure carrying the policy's reply (never plaintext, never an unverified
        certificate)."""
        req = requirement or Requirement()
        try:
            conn = await cls._open(host, helo, tls_context, connect_timeout, command_timeout)
        except _TlsFailed as e:
            if req.needs_tls:
                failure = f"TLS failed: {e.detail}"
                reply = status_for_failure(req, failure, f"{host}: {failure}")
                raise ConnectFailure(host, e.detail, reply, policy=req.policy) from None
            conn = await cls._open(host, helo, None, connect_timeout, command_timeout)
            conn.tls_failure = e.detail
        conn.policy = req.policy
        transport = conn._wire.transport
        if transport is not None:
            sockname = transport.get_extra_info("sockname")
            conn.local_address = str(sockname[0]) if sockname else ""
        if judge is None:
            return conn
        chain: list[bytes] = []
        if conn.tls and transport is not None:
            chain = peer_chain(transport.get_extra_info("ssl_object"))
        verdict = judge(req, conn.tls, chain)
        conn.verified, conn.peer, conn.tls_note = verdict.verified, verdict.peer, verdict.would_fail
        problem: Reply | None = None
        if verdict.failure:
            shown = f"{host}: {verdict.failure}"
            if conn.tls:
                shown += f" (peer certificate: {verdict.peer})"
            problem = status_for_failure(req, verdict.failure, shown)
        elif req.needs_requiretls and not conn.supports("requiretls"):
            problem = REQUIRETLS_UNSUPPORTED
        if problem is not None:
            await conn.close()  # QUIT: nothing of any message was sent (RFC 8689 §4.2.1)
            detail = problem.text
            if problem is REQUIRETLS_UNSUPPORTED:
                detail = f"{host}: {detail}"
            raise ConnectFailure(host, detail, problem, tls=conn.tls, policy=req.policy,
                                 peer=verdict.peer, verified=verdict.verified,
                                 local_address=conn.local_address)  # fmt: skip
        return conn

    @classmethod
    async def _open(
        cls,
        host: Host,
        helo: str,
        tls_context: ssl.SSLContext | None,
        connect_timeout: float,
        command_timeout: float,
    ) -> Connection:
        loop = asyncio.get_running_loop()
        machine = ClientConnection()
        try:
            async with asyncio.timeout(connect_timeout):
                _, wire = await loop.create_connection(
                    lambda: _Wire(machine), host.address, host.port
                )
        except (OSError, TimeoutError) as e:
            raise ConnectFailure(host, f"{host}: {_describe(e)}") from None
        try:
            tls = await _start_session(host, wire, helo, tls_context, connect_timeout,
                                       command_timeout)  # fmt: skip
        except BaseException:  # ConnectFailure, _TlsFailed, cancellation: the socket goes
            wire.abort()
            raise
        return cls(host, wire, tls, command_timeout)

    def supports(self, extension: str) -> bool:
        return self._machine.supports(extension)

    async def close(self) -> None:
        """QUIT politely when possible; never raises."""
        if self._is_closed:
            return
        self._is_closed = True
        wire = self._wire
        try:
            if self._machine.may(Command.QUIT):
                self._machine.quit()
                wire.flush()
                await wire.next_event(min(self.timeout, 5.0))
        except (TimeoutError, OSError):  # ConnectionError included
            pass
        finally:
            wire.close()

    def abort(self) -> None:
        self._is_closed = True
        self._machine.abort("aborted")
        self._wire.abort()

    async def deliver(self, transfer: Transfer) -> list[RecipientResult]:
        """Send one transaction; one result per recipient of `transfer`, in order."""
        env = transfer.envelope
        results: dict[str, RecipientResult] = {}
        host = self.host
        has_dsn = self.supports("dsn")

        def result(address: str, status: Status, reply: Reply | None, detail: str) -> None:
            passed = has_dsn and status == "delivered"
            results[address] = RecipientResult(
                address, status, reply, detail, host, self.tls, dsn_passed=passed,
                verified=self.verified, policy=self.policy, peer=self.peer, note=self.tls_note,
            )  # fmt: skip

        # --- what the message needs, and whether this server can take it ------------------
        sender_utf8 = not env.mail_from.isascii()
        needs_utf8 = sender_utf8 or (env.smtputf8 and header_needs_utf8(transfer.head))
        has_utf8 = self.supports("smtputf8")
        sendable: list[Recipient] = []
        for rcpt in transfer.recipients:
            if not _is_sendable(rcpt.address):
                result(rcpt.address, "failed", BAD_RECIPIENT_SYNTAX, "bad recipient address")
            elif not has_utf8 and (needs_utf8 or not rcpt.address.isascii()):
                result(rcpt.address, "failed", SMTPUTF8_UNSUPPORTED, f"{host}: no SMTPUTF8")
            else:
                sendable.append(rcpt)
        if not _is_sendable(env.mail_from):
            for rcpt in sendable:
                result(rcpt.address, "failed", BAD_SENDER_SYNTAX, "bad sender address")
            sendable = []
        if not sendable:
            return [results[r.address] for r in transfer.recipients]
        use_utf8 = has_utf8 and (
            env.smtputf8 or not all(r.address.isascii() for r in sendable) or sender_utf8
        )

        mail_params: list[str] = []
        if self.supports("size"):
            mail_params.append(f"SIZE={transfer.size}")
        is_8bit = env.body == "8BITMIME" or not transfer.is_ascii
        if is_8bit and self.supports("8bitmime"):
            mail_params.append("BODY=8BITMIME")
        # Without 8BITMIME an 8-bit body goes as is, as Postfix and Exim do: nearly every
        # server takes it, and a MIME downgrade would break DKIM signatures.
        if use_utf8:
            mail_params.append("SMTPUTF8")
        if env.requiretls and self.supports("requiretls"):
            mail_params.append("REQUIRETLS")  # RFC 8689 §4.2.1: passed on to the next hop
        if has_dsn:
            if env.ret in ("FULL", "HDRS"):
                mail_params.append(f"RET={env.ret}")
            if env.envid is not None:
                mail_params.append(f"ENVID={xtext(env.envid)}")
        rcpts: list[tuple[str, list[str]]] = []
        for rcpt in sendable:
            params: list[str] = []
            if has_dsn:
                if rcpt.notify:
                    params.append("NOTIFY=" + ",".join(rcpt.notify))
                if rcpt.orcpt:
                    param = orcpt_param(rcpt.orcpt)
                    if param is not None:
                        params.append(param)
            rcpts.append((rcpt.address, params))

        done, why = await self._transaction(
            env.mail_from, mail_params, rcpts, transfer.message, transfer.clean_from
        )
        self._record(done, why, [r.address for r in sendable], result)
        return [results[r.address] for r in transfer.recipients]

    async def _transaction(
        self,
        mail_from: str,
        params: list[str],
        rcpts: list[tuple[str, list[str]]],
        message: bytes | StoredMessage,
        clean_from: int | None = None,
    ) -> tuple[TransactionDone | None, str]:
        """Run one transaction: its replies, and why the connection ended ("" if it did not).
        None when nothing could be sent at all."""
        machine, wire = self._machine, self._wire
        if not self.is_usable:
            return None, wire.lost or "connection closed"
        stored = message if isinstance(message, StoredMessage) else None
        text = message if isinstance(message, bytes) else None  # None: streamed
        machine.send_transaction(mail_from, params, rcpts, text, clean_from=clean_from)
        wire.flush()
        done: TransactionDone | None = None
        why = ""
        for _ in range(2):  # the replies; after a streamed text, the reply to it
            try:
                await wire.wait(self.timeout)
            except (TimeoutError, ConnectionError) as e:
                # The machine then yields what it knows: the replies that came before.
                machine.abort(_describe(e))
            is_text_wanted = False
            for _ in range(3):  # at most TextWanted or TransactionDone, then ConnectionClosed
                event = machine.next_event()
                if isinstance(event, TextWanted):
                    is_text_wanted = True
                elif isinstance(event, TransactionDone):
                    done = event
                elif isinstance(event, ConnectionClosed):
                    why = event.reason
            if not is_text_wanted or stored is None:
                break
            await self._send_text(stored)
        if machine.is_closed:
            # Nothing unresolved is known to be delivered, so it is retried (a duplicate is
            # possible only if the server took the final dot and the reply was lost: RFC 1047).
            self.abort()
        return done, why or "connection closed"

    async def _send_text(self, stored: StoredMessage) -> None:
        """A streamed message's text after the 354: a chunk read from the spool (in a
        thread), handed to the machine, written, and the next only once the transport has
        taken it (so one connection holds about one chunk). A failed read aborts the
        transaction without the final dot: a truncated message must never be delivered."""
        machine, wire = self._machine, self._wire
        try:
            chunks = stored.chunks()
            for _ in range(stored.size + 1):  # bounded: every chunk has at least one byte
                chunk = await asyncio.to_thread(next, chunks, b"")
                if not chunk or machine.is_closed:
                    break
                machine.send_text(chunk)
                wire.flush()
                await wire.drained(self.timeout)
            machine.end_text()
            wire.flush()
        except (TimeoutError, ConnectionError) as e:
            machine.abort(_describe(e))
        except Exception as e:  # the spool could not be read: never send the final dot
            machine.abort(f"cannot read the message from the spool: {e}")

    def _record(
        self, done: TransactionDone | None, why: str, addresses: list[str], result: _ResultFn
    ) -> None:
        """One result per address from the replies of the transaction (RFC 5321 §3.3)."""
        host = self.host

        def lost(address: str, stage: str) -> None:
            detail = f"lost connection with {host} while sending {stage}: {why}"
            result(address, "deferred", None, detail)

        if done is None or done.mail is None:
            self.was_stale = self.transactions > 0
            for address in addresses:
                lost(address, "MAIL FROM")
            return
        mail = done.mail.to_reply()
        if status_of_reply(mail) != "delivered":
            for address in addresses:
                self._remote(result, address, mail, "MAIL FROM")
            return
        accepted: list[str] = []
        for address, rcpt_reply in zip(addresses, done.rcpts, strict=True):
            if rcpt_reply is None:
                lost(address, "RCPT TO")
                continue
            reply = rcpt_reply.to_reply()
            if status_of_reply(reply) == "delivered":
                accepted.append(address)
            else:
                self._remote(result, address, reply, "RCPT TO")
        final: ServerReply | None = done.message
        if done.data is not None and done.data.code != 354:
            final = done.data  # DATA itself was refused
        if final is None:
            for address in accepted:
                lost(address, "DATA")
            return
        reply = final.to_reply()
        if status_of_reply(reply) != "delivered":
            for address in accepted:
                self._remote(result, address, reply, "DATA")
            return
        for address in accepted:
            result(address, "delivered", reply, f"{host} said: {reply.line()}")
        if accepted:
            self.transactions += 1

    def _remote(self, result: _ResultFn, address: str, reply: Reply, stage: str) -> None:
        detail = f"{self.host} said: {reply.line()} (in reply to {stage})"
        result(address, status_of_reply(reply), reply, detail)


async def _start_session(
    host: Host,
    wire: _Wire,
    helo: str,
    tls_context: ssl.SSLContext | None,
    connect_timeout: float,
    command_timeout: float,
) -> bool:
    """Greeting, EHLO and opportunistic STARTTLS with EHLO again; whether TLS is on."""
    machine = wire.machine
    try:
        event = await wire.next_event(connect_timeout)
        if not isinstance(event, Greeting):
            raise ConnectFailure(host, f"{host}: {_reason(event)}")
        if not event.reply.is_positive:
            reply = event.reply.to_reply()
            machine.quit()  # RFC 5321 §3.1: after a refusing greeting, QUIT
            wire.flush()
            wire.close()
            raise ConnectFailure(host, f"{host} greeting: {reply.line()}", reply)
        await _hello(host, wire, helo, command_timeout)
        if tls_context is None or not machine.supports("starttls"):
            return False
        machine.starttls()
        wire.flush()
        event = await wire.next_event(connect_timeout)
    except (TimeoutError, OSError) as e:
        raise ConnectFailure(host, f"{host}: {_describe(e)}") from None
    except _Lost as e:
        raise ConnectFailure(host, f"{host}: {e.reason}") from None
    if not isinstance(event, StartTlsReply):
        raise ConnectFailure(host, f"{host}: {_reason(event)}")
    if not event.reply.is_positive:
        return False  # a 4xx/5xx to STARTTLS: the plaintext session goes on (RFC 3207 §4)
    if machine.is_closed:  # bytes after the 220 in the same read: injected (RFC 3207 §5)
        raise ConnectFailure(host, f"{host}: {_reason(machine.next_event())}")
    try:
        await wire.start_tls(
            tls_context, None if host.name == host.address else host.name, connect_timeout
        )
    except (OSError, TimeoutError, ValueError) as e:  # ssl.SSLError is an OSError; ValueError:
        # a context that wants a host name to check when there is none (an address).
        raise _TlsFailed(f"{host} TLS handshake: {_describe(e)}") from None
    machine.tls_started()
    if machine.is_closed:  # plaintext arrived after the 220, before the handshake
        raise ConnectFailure(host, f"{host}: {_reason(machine.next_event())}")
    # RFC 3207 §4.2: forget what was learnt before TLS; EHLO again. With TLS 1.3 a server that
    # rejects us (client certificate required) says so only now, by closing: that is a TLS
    # failure too.
    try:
        await _hello(host, wire, helo, command_timeout)
    except (TimeoutError, OSError) as e:
        raise _TlsFailed(f"{host} TLS session: {_describe(e)}") from None
    except _Lost as e:
        raise _TlsFailed(f"{host} TLS session: {e.reason}") from None
    return True


async def _hello(host: Host, wire: _Wire, helo: str, idle_limit: float) -> None:
    """EHLO (the machine falls back to HELO); ConnectFailure when refused, _Lost when the
    connection ended."""
    wire.machine.ehlo(helo)
    wire.flush()
    event = await wire.next_event(idle_limit)
    if not isinstance(event, EhloReply):
        raise _Lost(_reason(event))
    if not event.reply.is_positive:
        reply = event.reply.to_reply()
        verb = "EHLO" if event.is_extended else "HELO"
        raise ConnectFailure(host, f"{host} {verb}: {reply.line()}", reply)


def _is_sendable(address: str) -> bool:
    """An address that can go inside <...> on a command line."""
    if _UNSAFE_ADDRESS.search(address):
        return False
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def _reason(event: ClientEvent | object) -> str:
    if isinstance(event, ConnectionClosed):
        return event.reason
    return f"unexpected {type(event).__name__}"


class _Lost(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _TlsFailed(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _describe(e: BaseException) -> str:
    """One line for a network error, without class-name noise for the common cases."""
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    text = str(e).replace("\r", " ").replace("\n", " ").strip()
    return text or type(e).__name__

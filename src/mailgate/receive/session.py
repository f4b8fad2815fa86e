"""One SMTP session: drives a ServerConnection over a Channel and asks the world for decisions.

Owns: the asyncio side of a connection: timeouts, STARTTLS, AUTH verification, policy questions,
streaming DATA into the spool, and handing the message to `accept`. Any exception while handling
an event becomes 451 4.3.0 for this session only (STYLE.md §4), details in the log.
Must not: parse SMTP (smtp.server does) or decide policy (policy.py does).

Timeouts (RFC 5321 §4.5.3.2): the command timeout runs from the last *progress* (an event or a
reply), not from the last byte, so a client dribbling one byte at a time (slowloris) is cut off
as surely as an idle one. On the smart host only: `limits.greeting_delay` holds the 220 back and
refuses a client that talks first (554 5.7.0, pipelining-before-greeting bots), and
`smarthost.require_rdns` checks forward-confirmed reverse DNS at connect (receive/rdns.py); the
refusal (550 5.7.1, or 450 4.7.1 when DNS could not answer) is given at MAIL, where every client
reports it, and a confirmed name goes into the Received: header.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailgate import metrics, replies, tracelog
from mailgate.accept import Acceptor, SessionFacts, Transaction, refused
from mailgate.auth.authenticator import Authenticator
from mailgate.config import Config
from mailgate.errors import AuthUnavailable, Rejected, SpoolError, SpoolFull
from mailgate.policy import Policy, Sender, check_destination
from mailgate.receive.channel import Channel, Interrupted, PlaintextAfterStartTls
from mailgate.receive.rdns import ReverseDns
from mailgate.smtp.events import (
    SMARTHOST,
    Auth,
    Close,
    DataStart,
    Ehlo,
    EndOfData,
    Event,
    MailFrom,
    MessageChunk,
    Profile,
    Quit,
    RcptTo,
    Reset,
    StartTls,
)
from mailgate.smtp.server import NEED_DATA, ServerConnection
from mailgate.spool.api import SpoolStore
from mailgate.spool.incoming import Incoming
from mailgate.values import Trace, with_keyword

if TYPE_CHECKING:
    from mailgate.limits.breaker import SuspendingDirectory
    from mailgate.limits.counters import Counters

log = logging.getLogger(__name__)

_TLS_HANDSHAKE_TIMEOUT = 30.0
_AUTH_MIN_SECONDS = 0.0  # the guard's delays do the slowing; argon2 already costs tens of ms


@dataclass(slots=True)
class Services:
    """Everything a session needs, built once by `cli serve`."""

    cfg: Config
    store: SpoolStore
    policy: Policy
    acceptor: Acceptor
    directory: SuspendingDirectory  # the breaker's suspension, nothing else of the directory
    authenticator: Authenticator
    tls: ssl.SSLContext | None
    counters: Counters | None = None  # rate limits, AUTH defence, breaker (limits.counters)
    rdns: ReverseDns | None = None  # made on first use when smarthost.require_rdns is set


def new_session_id() -> str:
    # A name for log lines, not a secret: no getrandom() system call per connection. (The
    # random module reseeds itself in every forked worker.)
    return f"{random.getrandbits(40):010X}"


class Session:
    def __init__(self, services: Services, channel: Channel, profile: Profile) -> None:
        self.s = services
        self.channel = channel
        self.profile = profile
        self.sid = new_session_id()
        peer = channel.get_extra_info("peername")
        sock = channel.get_extra_info("sockname")
        self.client_ip = str(peer[0]) if isinstance(peer, tuple) else "unknown"
        self.client_port = int(peer[1]) if isinstance(peer, tuple) else 0
        self.local_port = int(sock[1]) if isinstance(sock, tuple) else 0
        limits = services.cfg.limits
        self.conn = ServerConnection(
            profile,
            services.cfg.hostname,
            max_message_size=limits.max_message_size,
            max_recipients=limits.max_recipients,
            max_errors=limits.max_errors,
            token_auth=services.authenticator.accepts_tokens,
            token_scope=services.cfg.auth.oauth.scope,
            token_openid_configuration=services.cfg.auth.oauth.openid_configuration,
        )
        self.txn: Transaction | None = None
        self.incoming: Incoming | None = None
        self.write_error: Exception | None = None
        self.extended = True
        self.login: str | None = None
        self.addresses: tuple[str, ...] = ()  # what the auth backend vouches for (auth.Identity)
        self.mechanism: str | None = None
        self.in_data = False
        self.closing = False
        self.stopping = False  # the server stops: 421 4.3.2 instead of the next command
        self.client_name = ""  # forward-confirmed reverse DNS name, for Received:
        self.rdns_refusal: replies.Reply | None = None  # answered at MAIL (require_rdns)
        self.deadline = 0.0  # loop time: the end of the current command or data timeout
        self._taken_over = False  # _direct() stopped and woke run()
        self._parked: Event | None = None  # the event it stopped at, for run() to handle
        self._direct_handled = 0
        self._direct_error: Exception | None = None

    # --- main loop ------------------------------------------------------------------
    async def run(self) -> None:
        log.info("sid=%s connect service=%s client=[%s]:%d port=%d",
                 self.sid, self.profile.name, self.client_ip, self.client_port,
                 self.local_port)  # fmt: skip
        metrics.CONNECTIONS.labels(self.profile.name).inc()
        metrics.SESSIONS.labels(self.profile.name).inc()
        try:
            if not await self._before_greeting():
                return
            self.conn.start()
            await self._flush()
            loop = asyncio.get_running_loop()
            self.deadline = loop.time() + self._timeout()
            self.channel.direct = self._direct
            while not self.closing:
                if self.stopping and not self.in_data:
                    self._say_shutting_down()
                    break
                try:
                    data = await self.channel.read(self.deadline)
                except Interrupted:
                    continue  # stopping: answered at the top of the loop
                except TimeoutError:
                    log.info("sid=%s timeout after %.0fs without progress",
                             self.sid, self._timeout())  # fmt: skip
                    self.channel.write(replies.TIMEOUT.to_bytes())
                    break
                handled = 0
                if self._taken_over:
                    # The protocol callback fed its bytes to the machine already and stopped
                    # at what needs this coroutine (see _direct); `data` is only what arrived
                    # since, for after that event.
                    self._taken_over = False
                    handled = await self._take_over()
                    if data:
                        self.conn.receive_data(data)
                else:
                    self.conn.receive_data(data)
                handled += await self._process_events()
                if await self._flush() or handled:
                    # Only progress restarts the clock: bytes that complete no command do not.
                    self.deadline = loop.time() + self._timeout()
        except Interrupted:  # stopped before the greeting (smart host greeting delay)
            self._say_shutting_down()
        except (ConnectionError, TimeoutError) as e:
            log.info("sid=%s connection lost: %s", self.sid, e)
            # A peer that does not read (the drain timed out) would keep close() waiting to
            # flush our replies forever, holding the socket and its buffer: reset instead.
            self.channel.abort()
        except Exception:
            log.exception("sid=%s session failed", self.sid)
            self.channel.write(replies.INTERNAL_ERROR.to_bytes())
        finally:
            self.channel.direct = None
            metrics.SESSIONS.labels(self.profile.name).dec()
            self._drop_incoming()
            self.channel.close()
            log.info("sid=%s disconnect client=[%s]", self.sid, self.client_ip)

    def shutdown(self) -> None:
        """The server stops: `421 4.3.2` at the next command, at once if the client is idle;
        a DATA in progress is received and answered first (INTERFACE.md, "Operating it")."""
        self.stopping = True
        if not self.in_data:
            self.channel.interrupt()

    def _say_shutting_down(self) -> None:
        log.info("sid=%s server stopping: %s", self.sid, replies.SHUTTING_DOWN.line())
        self.channel.write(replies.SHUTTING_DOWN.to_bytes())

    def _timeout(self) -> float:
        limits = self.s.cfg.limits
        return limits.data_timeout if self.in_data else limits.command_timeout

    async def _flush(self) -> bool:
        """Write the machine's replies; True when there were any."""
        data = self.conn.data_to_send()
        if data:
            self.channel.write(data)
        if not self.channel.is_writable:  # (replies _direct() wrote count too)
            # A client that never reads our replies must not hold the session forever.
            await asyncio.wait_for(self.channel.drain(), self.s.cfg.limits.command_timeout)
        return bool(data)

    async def _process_events(self) -> int:
        """Handle every event the received bytes make; return how many there were."""
        handled = 0
        while not self.closing:
            event = self.conn.next_event()
            if event is NEED_DATA:
                return handled
            assert isinstance(event, Event)
            handled += 1
            try:
                await self._handle(event)
            except Exception as e:
                if not self._handler_failed(event, e):
                    return handled
        return handled

    def _handler_failed(self, event: Event, error: Exception) -> bool:
        """Answer an event whose handling raised; False when the session must end."""
        if isinstance(error, Rejected):
            log.info("sid=%s refused %s reply=%r reason=%r",
                     self.sid, type(event).__name__, error.reply.line(), error.reason)  # fmt: skip
            self._count_refusal(event, error.reply)
            self.conn.send(error.reply)
            return True
        log.error("sid=%s error handling %s", self.sid, type(event).__name__, exc_info=error)
        self._drop_incoming()
        if self.conn.pending_event is None:
            # Nothing to answer (a failed MessageChunk, say): end this session only.
            self.channel.write(replies.INTERNAL_ERROR.to_bytes())
            self.closing = True
            return False
        self.conn.send(replies.INTERNAL_ERROR)
        return True

    # --- the direct path: the machine driven from the protocol callback ------------------
    def _direct(self, data: bytes) -> bool:
        """Channel.data_received's fast path (issue #19), called only while run() waits in
        read() with nothing buffered: feed the machine and handle every event that needs
        nothing but this process (EHLO, MAIL, message chunks, RSET; RCPT and DATA when the
        limits are this process's own) right here, and write the replies: no Task wake-up, no
        coroutine per command. Returns False to wake run() instead (the bytes are in the
        machine already): an event that must await (STARTTLS, AUTH, end of data, shared
        limits), the end of the session, a stopping server, a client that does not read our
        replies, or an error."""
        handled = 0
        try:
            self.conn.receive_data(data)
            while True:
                event = self.conn.next_event()
                if event is NEED_DATA:
                    break
                assert isinstance(event, Event)
                handled += 1
                try:
                    done = self._handle_now(event)
                except Exception as e:
                    if not self._handler_failed(event, e):
                        return self._wake_run(handled)
                    continue
                if not done:
                    self._parked = event
                    return self._wake_run(handled)
                if self.closing:
                    return self._wake_run(handled)
            out = self.conn.data_to_send()
            if out:
                self.channel.write(out)
        except Exception as e:  # a bug: run() logs it and ends this session with a 451
            self._direct_error = e
            return self._wake_run(handled)
        if out or handled:
            self.deadline = asyncio.get_running_loop().time() + self._timeout()
            self.channel.extend_deadline(self.deadline)
        if (self.stopping and not self.in_data) or not self.channel.is_writable:
            return self._wake_run(0)
        return True

    def _wake_run(self, handled: int) -> bool:
        self._taken_over = True
        self._direct_handled = handled
        return False

    async def _take_over(self) -> int:
        """In run(), after _direct() stopped: finish the event it parked; how many events the
        callback handled (progress, for the deadline)."""
        handled, self._direct_handled = self._direct_handled, 0
        if self._direct_error is not None:
            error, self._direct_error = self._direct_error, None
            raise error
        event, self._parked = self._parked, None
        if event is not None:
            try:
                await self._handle(event)
            except Exception as e:
                self._handler_failed(event, e)
        return handled

    def _count_refusal(self, event: Event, reply: replies.Reply) -> None:
        metrics.REFUSED.labels(self.profile.name, str(reply.code)).inc()
        tracelog.refused(command=_COMMANDS.get(type(event).__name__, type(event).__name__),
                         address=str(getattr(event, "address", "")), login=self.login or "",
                         service=self.profile.name, client=self.client_ip, sid=self.sid,
                         reply=reply.line())  # fmt: skip

    # --- before the greeting (smart host) ------------------------------------------------
    async def _before_greeting(self) -> bool:
        """The greeting delay and the rDNS check, side by side. False: end without a 220.
        (A client locked out by the AUTH guard never gets here: receive.serve refuses it.)"""
        if self.profile.name != SMARTHOST.name:
            return True
        cfg = self.s.cfg
        lookup = None
        if cfg.smarthost.require_rdns:
            lookup = asyncio.get_running_loop().create_task(self._check_rdns())
        try:
            if cfg.limits.greeting_delay > 0 and await self._talks_first(cfg.limits.greeting_delay):
                return False
            if lookup is not None:
                await lookup  # bounded by smarthost.rdns_timeout (ReverseDns)
        finally:
            if lookup is not None and not lookup.done():
                lookup.cancel()
        return True

    async def _talks_first(self, delay: float) -> bool:
        """Wait `delay` seconds for silence. True when the client sent bytes (refused with
        554 5.7.0: RFC 5321 §4.3.1 has the client wait for the greeting) or went away."""
        try:
            data = await self.channel.read(asyncio.get_running_loop().time() + delay)
        except TimeoutError:
            return False
        if data:
            log.warning("sid=%s early talker: %d bytes before the greeting client=[%s]",
                        self.sid, len(data), self.client_ip)  # fmt: skip
            self.channel.write(replies.EARLY_TALKER.to_bytes())
        return True

    async def _check_rdns(self) -> None:
        if self.s.rdns is None:
            cfg = self.s.cfg
            self.s.rdns = ReverseDns(cfg.delivery.nameservers, timeout=cfg.smarthost.rdns_timeout)
        result = await self.s.rdns.check(self.client_ip)
        if result.status == "confirmed":
            self.client_name = result.name
        elif result.status == "failed":
            self.rdns_refusal = replies.RDNS_REQUIRED
        else:
            self.rdns_refusal = replies.RDNS_TEMPFAIL
        log.info("sid=%s rdns=%s client=[%s] name=%s %s", self.sid, result.status,
                 self.client_ip, result.name or "-", result.detail)  # fmt: skip

    # --- events ---------------------------------------------------------------------
    def _handle_now(self, event: Event) -> bool:
        """Handle an event that needs no await; False when it needs _handle()."""
        match event:
            case MessageChunk(data=data):
                self._write_chunk(data)
            case Ehlo(domain=domain, extended=extended):
                self.extended = extended
                self._drop_incoming()
                log.info("sid=%s ehlo=%s", self.sid, _safe(domain))
                self.conn.send(replies.OK)
            case MailFrom():
                self.conn.send(self._mail(event))
            case RcptTo() if self._limits_now():
                self._check_rcpt(event)
                self._local_limits_rcpt(event)
                self.conn.send(replies.RECIPIENT_OK)
            case DataStart() if self._limits_now():
                self._local_limits_message()
                self._begin_data()
                self.conn.send(replies.START_DATA)
            case Reset():
                self._drop_incoming()
                self.txn = None
            case Quit() | Close():
                self.closing = True
            case _:
                return False
        return True

    async def _handle(self, event: Event) -> None:
        if self._handle_now(event):
            return
        match event:
            case StartTls():
                await self._start_tls()
            case Auth():
                await self._auth(event)
            case RcptTo():
                await self._rcpt(event)
                self.conn.send(replies.RECIPIENT_OK)
            case DataStart():
                await self._data_start()
                self.conn.send(replies.START_DATA)
            case EndOfData():
                self.conn.send(await self._end_of_data(event))
            case _:
                raise AssertionError(f"unhandled event {event!r}")

    async def _start_tls(self) -> None:
        assert self.s.tls is not None, "STARTTLS offered without a TLS context"
        ready = self.conn.data_to_send()  # the 220 goes out in plaintext
        try:
            await self.channel.start_tls(self.s.tls, _TLS_HANDSHAKE_TIMEOUT, ready)
        except PlaintextAfterStartTls:
            log.warning("sid=%s plaintext pipelined after STARTTLS: closing", self.sid)
            self.closing = True
            return
        except (ssl.SSLError, ConnectionError, TimeoutError, OSError) as e:
            log.info("sid=%s tls handshake failed: %s", self.sid, e)
            self.closing = True
            return
        self.conn.tls_started()
        log.info("sid=%s starttls %s", self.sid, self._tls_description())

    async def _auth(self, event: Auth) -> None:
        guard = self.s.counters
        delay = 0.0
        decision = None
        if guard is not None:
            # Counted before the hash is verified (issue #11, class 6): a burst of parallel
            # connections cannot all get past the guard while the first hashes still run.
            decision = await guard.begin_attempt(self.client_ip, event.login)
            if decision.is_refused:
                assert decision.reply is not None
                metrics.AUTH_DEFENCE.labels("refused").inc()
                log.warning("sid=%s auth refused (%s) client=[%s]",
                            self.sid, decision.reason, self.client_ip)  # fmt: skip
                self.conn.send(decision.reply)
                self.closing = True
                return
            delay = decision.delay
            if delay > 0:
                metrics.AUTH_DEFENCE.labels("delayed").inc()
                log.info("sid=%s auth delayed seconds=%.2f client=[%s]",
                         self.sid, delay, self.client_ip)  # fmt: skip
        user = None
        unavailable = False
        try:
            if delay > 0:
                await asyncio.sleep(delay)
            user = await self.s.authenticator.verify(event.login, event.password, event.mechanism)
        except AuthUnavailable as e:  # the backend is down or slow: temporary, never 535
            unavailable = True  # nothing was checked: the attempt is held against no one
            log.warning("sid=%s auth unavailable mech=%s login=%s backend=%s error=%s",
                        self.sid, event.mechanism, _safe(event.login),
                        self.s.authenticator.backend.name, _safe(str(e)))  # fmt: skip
            self.conn.send(replies.AUTH_TEMPORARILY_UNAVAILABLE)
            return
        finally:
            if guard is not None and decision is not None:
                await guard.end_attempt(self.client_ip, event.login, decision,
                                        succeeded=user is not None,
                                        verified=not unavailable)  # fmt: skip
        if user is None:
            metrics.AUTH_FAILURES.labels(self.profile.name).inc()
            log.info("sid=%s auth failed mech=%s login=%s client=[%s]",
                     self.sid, event.mechanism, _safe(event.login), self.client_ip)  # fmt: skip
            self.conn.send(replies.BAD_CREDENTIALS)
            return
        self.login = user.login
        self.addresses = user.addresses
        self.mechanism = event.mechanism
        app = f" app_password={_safe(user.app_password)}" if user.app_password else ""
        log.info("sid=%s auth ok mech=%s login=%s%s", self.sid, event.mechanism, user.login, app)
        self.conn.send(replies.AUTH_SUCCEEDED)

    def _sender(self) -> Sender:
        return Sender(service=self.profile.name, client_ip=self.client_ip, login=self.login,
                      addresses=self.addresses)  # fmt: skip

    def _mail(self, event: MailFrom) -> replies.Reply:
        if self.rdns_refusal is not None:
            raise Rejected(self.rdns_refusal, f"client {self.client_ip} failed require_rdns")
        mail_from = self.s.policy.check_sender(self._sender(), event.address)
        if mail_from != event.address:
            log.info("sid=%s envelope sender <%s> replaced by <%s>",
                     self.sid, event.address, mail_from)  # fmt: skip
        self.txn = Transaction(mail=event, mail_from=mail_from)
        return replies.SENDER_OK

    def _check_rcpt(self, event: RcptTo) -> None:
        assert self.txn is not None
        self.s.policy.check_rcpt(self._sender(), event.address)
        check_destination(event.address, self.s.cfg.smarthost.bad_nets,
                          allow_special=self.s.cfg.delivery.allow_internal_literals)  # fmt: skip

    async def _rcpt(self, event: RcptTo) -> None:
        self._check_rcpt(event)
        assert self.txn is not None
        if self.s.counters is not None:
            await self.s.counters.check_recipient(
                service=self.profile.name, login=self.login, ip=self.client_ip,
                rcpt_in_message=len(self.txn.rcpts) + 1,
            )  # fmt: skip
        self.txn.rcpts.append(event)

    def _limits_now(self) -> bool:
        """The direct path (_direct) may answer RCPT and DATA: the limits need no await (counted
        in this process, or shared counts read or recorded a moment ago: Counters.decides_now)."""
        counters = self.s.counters
        return counters is None or counters.decides_now(self.profile.name, self.login,
                                                        self.client_ip)  # fmt: skip

    def _local_limits_rcpt(self, event: RcptTo) -> None:
        """_rcpt()'s limit check and bookkeeping when _limits_now() said so."""
        assert self.txn is not None
        if self.s.counters is not None:
            self.s.counters.check_recipient_now(
                service=self.profile.name, login=self.login, ip=self.client_ip,
                rcpt_in_message=len(self.txn.rcpts) + 1,
            )  # fmt: skip
        self.txn.rcpts.append(event)

    async def _data_start(self) -> None:
        assert self.txn is not None
        if self.s.counters is not None:
            await self.s.counters.check_message(
                service=self.profile.name, login=self.login, ip=self.client_ip,
                nrcpt=len(self.txn.rcpts),
            )  # fmt: skip
        self._begin_data()

    def _local_limits_message(self) -> None:
        assert self.txn is not None
        if self.s.counters is not None:
            self.s.counters.check_message_now(
                service=self.profile.name, login=self.login, ip=self.client_ip,
                nrcpt=len(self.txn.rcpts),
            )  # fmt: skip

    def _begin_data(self) -> None:
        self.incoming = self.s.store.begin()
        self.write_error = None
        self.in_data = True

    def _write_chunk(self, data: bytes) -> None:
        if self.incoming is None or self.write_error is not None:
            return
        try:
            self.incoming.write(data)
        except SpoolError as e:  # answered at end of data, after the client finished sending
            self.write_error = e

    async def _end_of_data(self, event: EndOfData) -> replies.Reply:
        self.in_data = False
        incoming, txn = self.incoming, self.txn
        self.incoming, self.txn = None, None
        assert incoming is not None and txn is not None
        if event.too_big or event.bad_line or self.write_error is not None:
            incoming.abort()
            if event.too_big:
                return refused(self._facts(), txn, incoming.qid, replies.MESSAGE_TOO_BIG)
            if event.bad_line:
                return refused(self._facts(), txn, incoming.qid, replies.TEXT_LINE_TOO_LONG)
            log.error("sid=%s spool write failed: %s", self.sid, self.write_error)
            return refused(self._facts(), txn, incoming.qid,
                           replies.SPOOL_FULL if isinstance(self.write_error, SpoolFull)
                           else replies.INTERNAL_ERROR)  # fmt: skip
        reply = await self.s.acceptor.accept(self._facts(), txn, incoming)
        if reply.is_positive and self.s.counters is not None:
            trip = await self.s.counters.record_message(
                service=self.profile.name, login=self.login, ip=self.client_ip,
                nrcpt=len(txn.rcpts),
            )  # fmt: skip
            if trip is not None and self.login is not None:
                await self._trip_breaker(str(getattr(trip, "reason", "hard limit")))
        return reply

    async def _trip_breaker(self, reason: str) -> None:
        from mailgate.limits.breaker import suspend_account

        assert self.login is not None
        metrics.SUSPENSIONS.labels(self.profile.name).inc()
        await asyncio.to_thread(self.s.authenticator.keep_account, self.login, self.addresses)
        await asyncio.to_thread(suspend_account, self.s.directory, self.s.store, self.login, reason)

    def _facts(self) -> SessionFacts:
        tls = self._tls_description()
        trace = Trace(
            client_helo=self.conn.ehlo_domain or "",
            client_ip=self.client_ip,
            client_name=self.client_name,
            service=self.profile.name,
            port=self.local_port,
            with_keyword=with_keyword(
                extended=self.extended, tls=bool(tls), authenticated=self.login is not None
            ),
            tls=tls,
            login=self.login,
            mechanism=self.mechanism,
        )
        return SessionFacts(
            session_id=self.sid,
            sender=self._sender(),
            trace=trace,
            is_submission=self.login is not None,
        )

    def _tls_description(self) -> str:
        obj = self.channel.get_extra_info("ssl_object")
        if not isinstance(obj, ssl.SSLObject):
            return ""
        cipher = obj.cipher()
        return f"{obj.version()}:{cipher[0] if cipher else '?'}"

    def _drop_incoming(self) -> None:
        if self.incoming is not None:
            self.incoming.abort()
            self.incoming = None
        self.in_data = False


_COMMANDS = {"MailFrom": "MAIL", "RcptTo": "RCPT", "DataStart": "DATA", "EndOfData": "DATA"}


def _safe(text: str) -> str:
    if text.isprintable() and " " not in text:  # the usual EHLO name: no loop per character
        return text[:100]
    return "".join(c if c.isprintable() and c != " " else "?" for c in text)[:100]

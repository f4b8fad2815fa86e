"""One SMTP client connection to one host, and the transactions sent over it.

Owns: connecting (bounded timeouts), EHLO (HELO fallback), opportunistic STARTTLS, the MAIL /
RCPT / DATA sequence of one message to the recipients of one destination, and turning every
reply or network failure into one `RecipientResult` per recipient. Must not: touch the spool,
resolve names, decide retries or write logs about delivery outcomes (the engine does).

RFCs: 5321 §3.3 and §4.1 (the transaction, replies: 2xx ok, 4xx temporary, 5xx permanent),
§4.5.2 (dot-stuffing, done by aiosmtplib over strictly CRLF-normalised data: a bare CR or LF in
the stored bytes becomes CRLF, so mailgate is never the first hop of an SMTP smuggling chain),
3207 (STARTTLS, opportunistic: certificates are not verified, as every MTA does without
MTA-STS or DANE; `tls` is recorded), 6531 (SMTPUTF8 only when offered; a message that needs it
fails with 5.6.7 when the server lacks it), 6152 (BODY=8BITMIME only when offered), 1870
(SIZE), 3461 §4 (NOTIFY, ORCPT, RET, ENVID passed on to servers that offer DSN, xtext).
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import aiosmtplib

from mailgate.deliver.route import Host
from mailgate.replies import Reply
from mailgate.spool.entry import Envelope, Recipient

Status = Literal["delivered", "deferred", "failed"]
_ResultFn = Callable[[str, Status, Reply | None, str], None]

SMTPUTF8_UNSUPPORTED = Reply(
    550, "5.6.7", "Message needs SMTPUTF8 but the recipient server does not offer it"
)
BAD_RECIPIENT_SYNTAX = Reply(550, "5.1.3", "Recipient address cannot be sent over SMTP")
BAD_SENDER_SYNTAX = Reply(550, "5.1.7", "Sender address cannot be sent over SMTP")

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
# What may not appear inside <...> on a command line (aiosmtplib's own check, stated here so
# that a bad address gives a result instead of an exception).
_UNSAFE_ADDRESS = re.compile(r"[\x00-\x20<>\x7f]")


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """The outcome of one try for one recipient (STYLE.md §6).

    reply:       the remote reply, or our own diagnostic reply, or None.
    detail:      one line for the log and for `queue show` ("mx1[192.0.2.5]:25: refused").
    host:        where the try went, None when no host was reached.
    tls:         the transaction ran under TLS.
    dsn_passed:  the remote server offered DSN, so it now owns the NOTIFY request (RFC 3461
                 §4.1: a relaying MTA passes the request on instead of answering it).
    """

    address: str
    status: Status
    reply: Reply | None
    detail: str
    host: Host | None = None
    tls: bool = False
    dsn_passed: bool = False

    @property
    def reply_line(self) -> str:
        """The reply as one line for history, log and DSN."""
        return self.reply.line() if self.reply is not None else self.detail


@dataclass(frozen=True, slots=True)
class Transfer:
    """One message to some of its recipients, all for one destination."""

    qid: str
    envelope: Envelope
    recipients: tuple[Recipient, ...]
    message: bytes


class ConnectFailure(Exception):
    """A host could not be used: refused, timed out, TLS failed, or its greeting/EHLO was an
    error reply (`reply`, when the server gave one)."""

    def __init__(self, host: Host, detail: str, reply: Reply | None = None) -> None:
        super().__init__(detail)
        self.host = host
        self.detail = detail
        self.reply = reply


def reply_of(code: int, message: str) -> Reply:
    """A remote reply as a Reply: the enhanced code if the server gave one (RFC 2034), else
    the class of the reply code ("X.0.0")."""
    text = " ".join(part.strip() for part in message.splitlines() if part.strip())
    first, _, rest = text.partition(" ")
    if _ENHANCED.match(first) and first[0] == str(code)[0]:
        return Reply(code, first, rest)
    klass = str(code)[0] if str(code)[0] in "245" else "4"
    return Reply(code, f"{klass}.0.0", text)


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


class Connection:
    """An open SMTP session with one host, reusable for several transactions."""

    def __init__(self, host: Host, smtp: aiosmtplib.SMTP, tls: bool, timeout: float) -> None:
        self.host = host
        self.smtp = smtp
        self.tls = tls
        self.timeout = timeout
        self.transactions = 0
        self.is_usable = True
        self.tls_failure = ""  # why TLS was given up on this host, for the log

    @classmethod
    async def open(
        cls,
        host: Host,
        *,
        helo: str,
        tls_context: ssl.SSLContext | None,
        connect_timeout: float,
        command_timeout: float,
    ) -> Connection:
        """Connect, read the greeting, EHLO, and STARTTLS when offered (and a context is
        given). A failed TLS handshake is retried once in plaintext, as opportunistic TLS
        means "encrypt when possible", not "refuse to deliver"."""
        try:
            return await cls._open(host, helo, tls_context, connect_timeout, command_timeout)
        except _TlsFailed as e:
            conn = await cls._open(host, helo, None, connect_timeout, command_timeout)
            conn.tls_failure = e.detail
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
        smtp = aiosmtplib.SMTP(
            hostname=host.address,
            port=host.port,
            local_hostname=helo,
            timeout=command_timeout,
            start_tls=False,
            validate_certs=False,
            tls_context=tls_context,
        )
        try:
            await smtp.connect(timeout=connect_timeout)
        except aiosmtplib.SMTPConnectResponseError as e:
            smtp.close()
            reply = reply_of(e.code, e.message)
            raise ConnectFailure(host, f"{host} greeting: {reply.line()}", reply) from None
        except (aiosmtplib.SMTPException, OSError) as e:
            smtp.close()
            raise ConnectFailure(host, f"{host}: {_describe(e)}") from None
        try:
            await cls._hello(smtp, host)
            tls = False
            if tls_context is not None and smtp.supports_extension("starttls"):
                try:
                    await smtp.starttls(
                        server_hostname=None if host.name == host.address else host.name,
                        timeout=connect_timeout,
                    )
                except aiosmtplib.SMTPResponseException:
                    # A 4xx/5xx to STARTTLS: the plaintext session goes on (RFC 3207 §4).
                    pass
                except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as e:
                    smtp.close()
                    raise _TlsFailed(f"{host} TLS handshake: {_describe(e)}") from None
                else:
                    tls = True
                    # RFC 3207 §4.2: forget what was learnt before TLS; EHLO again. With TLS
                    # 1.3 a server that rejects us (client certificate required) says so only
                    # now, by closing: that is a TLS failure too.
                    try:
                        await cls._hello(smtp, host)
                    except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as e:
                        if isinstance(e, aiosmtplib.SMTPResponseException):
                            raise
                        raise _TlsFailed(f"{host} TLS session: {_describe(e)}") from None
        except (ConnectFailure, _TlsFailed):
            smtp.close()
            raise
        except (aiosmtplib.SMTPException, OSError) as e:
            smtp.close()
            raise ConnectFailure(host, f"{host}: {_describe(e)}") from None
        return cls(host, smtp, tls, command_timeout)

    @staticmethod
    async def _hello(smtp: aiosmtplib.SMTP, host: Host) -> None:
        try:
            await smtp.ehlo()
        except aiosmtplib.SMTPHeloError as e:
            # RFC 5321 §4.1.1.1: an old server that does not know EHLO gets HELO.
            if e.code not in (500, 502):
                reply = reply_of(e.code, e.message)
                raise ConnectFailure(host, f"{host} EHLO: {reply.line()}", reply) from None
            try:
                await smtp.helo()
            except aiosmtplib.SMTPHeloError as e2:
                reply = reply_of(e2.code, e2.message)
                raise ConnectFailure(host, f"{host} HELO: {reply.line()}", reply) from None

    def supports(self, extension: str) -> bool:
        return self.smtp.supports_extension(extension)

    async def close(self) -> None:
        """QUIT politely when possible; never raises."""
        self.is_usable = False
        try:
            if self.smtp.is_connected:
                await asyncio.wait_for(self.smtp.quit(), min(self.timeout, 5.0))
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        finally:
            self.smtp.close()

    def abort(self) -> None:
        self.is_usable = False
        self.smtp.close()

    async def deliver(self, transfer: Transfer) -> list[RecipientResult]:
        """Send one transaction; one result per recipient of `transfer`, in order."""
        env = transfer.envelope
        results: dict[str, RecipientResult] = {}
        host = self.host
        has_dsn = self.supports("dsn")

        def result(address: str, status: Status, reply: Reply | None, detail: str) -> None:
            passed = has_dsn and status == "delivered"
            results[address] = RecipientResult(
                address, status, reply, detail, host, self.tls, dsn_passed=passed
            )

        # --- what the message needs, and whether this server can take it ------------------
        sender_utf8 = not env.mail_from.isascii()
        needs_utf8 = sender_utf8 or (env.smtputf8 and header_needs_utf8(transfer.message))
        has_utf8 = self.supports("smtputf8")
        sendable: list[Recipient] = []
        for rcpt in transfer.recipients:
            if _UNSAFE_ADDRESS.search(rcpt.address):
                result(rcpt.address, "failed", BAD_RECIPIENT_SYNTAX, "bad recipient address")
            elif not has_utf8 and (needs_utf8 or not rcpt.address.isascii()):
                result(rcpt.address, "failed", SMTPUTF8_UNSUPPORTED, f"{host}: no SMTPUTF8")
            else:
                sendable.append(rcpt)
        if _UNSAFE_ADDRESS.search(env.mail_from):
            for rcpt in sendable:
                result(rcpt.address, "failed", BAD_SENDER_SYNTAX, "bad sender address")
            sendable = []
        if not sendable:
            return [results[r.address] for r in transfer.recipients]
        use_utf8 = has_utf8 and (
            env.smtputf8 or not all(r.address.isascii() for r in sendable) or sender_utf8
        )
        encoding = "utf-8" if use_utf8 else "ascii"

        mail_params: list[str] = []
        if self.supports("size"):
            mail_params.append(f"SIZE={len(transfer.message)}")
        is_8bit = env.body == "8BITMIME" or not transfer.message.isascii()
        if is_8bit and self.supports("8bitmime"):
            mail_params.append("BODY=8BITMIME")
        # Without 8BITMIME an 8-bit body goes as is, as Postfix and Exim do: nearly every
        # server takes it, and a MIME downgrade would break DKIM signatures.
        if use_utf8:
            mail_params.append("SMTPUTF8")
        if has_dsn:
            if env.ret in ("FULL", "HDRS"):
                mail_params.append(f"RET={env.ret}")
            if env.envid is not None:
                mail_params.append(f"ENVID={xtext(env.envid)}")

        stage = "MAIL FROM"
        pending = [r.address for r in sendable]
        try:
            resp = await self._command(
                b"MAIL FROM:<" + env.mail_from.encode(encoding) + b">", mail_params
            )
            reply = reply_of(resp.code, resp.message)
            if status_of_reply(reply) != "delivered":
                for address in pending:
                    self._remote(result, address, reply, "MAIL FROM")
                await self._reset()
                return [results[r.address] for r in transfer.recipients]

            stage = "RCPT TO"
            accepted: list[str] = []
            for rcpt in sendable:
                params: list[str] = []
                if has_dsn:
                    if rcpt.notify:
                        params.append("NOTIFY=" + ",".join(rcpt.notify))
                    if rcpt.orcpt:
                        param = orcpt_param(rcpt.orcpt)
                        if param is not None:
                            params.append(param)
                resp = await self._command(
                    b"RCPT TO:<" + rcpt.address.encode(encoding) + b">", params
                )
                reply = reply_of(resp.code, resp.message)
                if status_of_reply(reply) == "delivered":
                    accepted.append(rcpt.address)
                else:
                    self._remote(result, rcpt.address, reply, "RCPT TO")
                    pending.remove(rcpt.address)
            if not accepted:
                await self._reset()
                return [results[r.address] for r in transfer.recipients]

            stage = "DATA"
            try:
                resp = await self.smtp.data(transfer.message, timeout=self.timeout)
            except aiosmtplib.SMTPDataError as e:
                reply = reply_of(e.code, e.message)
                for address in accepted:
                    self._remote(result, address, reply, "DATA")
                pending = []
                await self._reset()
                return [results[r.address] for r in transfer.recipients]
            reply = reply_of(resp.code, resp.message)
            for address in accepted:
                result(address, "delivered", reply, f"{host} said: {reply.line()}")
            pending = []
            self.transactions += 1
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError, UnicodeEncodeError) as e:
            # The connection is gone or unusable mid-transaction: nothing unresolved is known
            # to be delivered, so it is retried (a duplicate is possible only if the server
            # accepted the final dot and the reply was lost: RFC 1047).
            self.abort()
            detail = f"lost connection with {host} while sending {stage}: {_describe(e)}"
            for address in pending:
                if address not in results:
                    result(address, "deferred", None, detail)
        return [results[r.address] for r in transfer.recipients]

    def _remote(self, result: _ResultFn, address: str, reply: Reply, stage: str) -> None:
        detail = f"{self.host} said: {reply.line()} (in reply to {stage})"
        result(address, status_of_reply(reply), reply, detail)

    async def _command(self, line: bytes, params: Sequence[str]) -> aiosmtplib.SMTPResponse:
        """One command with ESMTP parameters; the reply whatever its code (no exception)."""
        args = [line, *(p.encode("ascii") for p in params)]
        return await self.smtp.execute_command(b" ".join(args), timeout=self.timeout)

    async def _reset(self) -> None:
        """RSET after a failed transaction, so the connection can carry the next one."""
        try:
            resp = await self.smtp.execute_command(b"RSET", timeout=self.timeout)
        except (aiosmtplib.SMTPException, OSError):
            self.abort()
            return
        if resp.code != 250:
            self.abort()


class _TlsFailed(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _describe(e: BaseException) -> str:
    """One line for a network error, without class-name noise for the common cases."""
    if isinstance(e, TimeoutError | aiosmtplib.SMTPTimeoutError):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    text = str(e).replace("\r", " ").replace("\n", " ").strip()
    return text or type(e).__name__

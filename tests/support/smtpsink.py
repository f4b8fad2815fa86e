"""Recording SMTP servers for tests: a scriptable receiving MTA on a loopback address.

Owns: a minimal RFC 5321 server that records every transaction (envelope, ESMTP parameters,
the exact DATA bytes on the wire, the un-stuffed message) and answers whatever the test
configures at each stage: greeting, EHLO, MAIL, RCPT (per address), DATA, end of data. It can
advertise or hide STARTTLS (RFC 3207), SMTPUTF8 (RFC 6531), 8BITMIME (RFC 6152), DSN (RFC 3461)
and PIPELINING (RFC 2920). Must not: listen anywhere but loopback, or interpret the message.

Each sink runs its own event loop in a background thread, so it serves equally a test that
drives the delivery engine with `asyncio.run(...)` and an engine running in another process.

    sink = SmtpSink().start()                 # first free 127.0.0.x on port 25
    sink.behaviour.rcpt_for["bob@example.org"] = "550 5.1.1 No such user"
    ...
    [t] = sink.wait_for(1)                    # blocking, bounded; `await sink.wait_for_async(1)`
    assert t.rcpt_to == ("alice@example.org",)
    sink.stop()

`python -m tests.support.smtpsink --host 127.0.0.1 --port 10026 --count-only` runs one in the
foreground (for benchmarks); it answers 250 to everything and keeps no message bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import errno
import ipaddress
import signal
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from tests.support.serving import Background
from tests.support.waiting import wait_for, wait_for_async

# Addresses tried, in order, when a sink is asked for "any free loopback address": on Linux the
# whole 127.0.0.0/8 is local, so each sink can own port 25 on its own address.
_FIRST_HOST = int(ipaddress.IPv4Address("127.0.0.2"))
_LAST_HOST = int(ipaddress.IPv4Address("127.0.0.254"))
_MAX_LINE = 4096
_MAX_DATA = 64 * 1024 * 1024


@dataclass
class Behaviour:
    """What the sink answers. Tests change fields at any time; the next command sees them.

    Reply fields are complete reply lines without CRLF ("451 4.3.0 Try later"). `greeting`
    may contain "{host}". `rcpt_for` maps a lower-cased address to its RCPT reply.
    `hang_up_after_data` closes the connection after the final dot without replying (the
    client cannot know whether the message was accepted). `hold_end_of_data` never answers
    the final dot and keeps the connection open until the client goes away (a client that is
    killed while waiting).
    """

    greeting: str = "220 {host} ESMTP sink"
    ehlo: str = "250"
    starttls: bool = False
    smtputf8: bool = True
    eightbitmime: bool = True
    dsn: bool = False
    pipelining: bool = True
    mail: str = "250 2.1.0 Ok"
    rcpt: str = "250 2.1.5 Ok"
    rcpt_for: dict[str, str] = field(default_factory=dict)
    data: str = "354 End data with <CR><LF>.<CR><LF>"
    end_of_data: str = "250 2.0.0 Ok: queued"
    hang_up_after_data: bool = False
    # Close the connection without a word when MAIL arrives after this many transactions on
    # it (a server that restarted while our pooled connection sat idle); None: never.
    hang_up_on_mail_after: int | None = None
    hold_end_of_data: bool = False
    requiretls: bool = False  # advertise REQUIRETLS under TLS (RFC 8689 §4.1)


@dataclass(frozen=True)
class Transaction:
    """One transaction that reached the end of DATA.

    helo:        the EHLO/HELO argument.
    mail_from:   the reverse path without brackets ("" for <>).
    mail_params: ESMTP parameters of MAIL ("BODY=8BITMIME", "RET=HDRS" ...).
    rcpt_to:     recipients whose RCPT got a 2xx, in order.
    rcpt_params: their RCPT parameters, by address.
    raw:         the exact bytes received after 354, up to and excluding the final ".\r\n"
                 (still dot-stuffed: what went over the wire).
    message:     `raw` un-stuffed (RFC 5321 §4.5.2).
    tls:         the transaction happened under TLS.
    reply:       what the sink answered to the final dot ("" if it hung up).
    """

    helo: str
    mail_from: str
    mail_params: tuple[str, ...]
    rcpt_to: tuple[str, ...]
    rcpt_params: dict[str, tuple[str, ...]]
    raw: bytes
    message: bytes
    tls: bool
    reply: str

    @property
    def is_accepted(self) -> bool:
        return self.reply.startswith("2")


class SmtpSink(Background):
    """One recording SMTP server on (host, port) in a background thread (its own event loop,
    not a socketserver: it overrides `start` and `stop`)."""

    def __init__(
        self,
        host: str | None = None,
        port: int = 25,
        *,
        hostname: str = "sink.test",
        tls: ssl.SSLContext | None = None,
        behaviour: Behaviour | None = None,
        count_only: bool = False,
    ) -> None:
        super().__init__()
        self.requested_host = host
        self.host = host or ""
        self.port = port
        self.hostname = hostname
        self.tls = tls
        self.behaviour = behaviour or Behaviour()
        self.count_only = count_only
        self.transactions: list[Transaction] = []
        self.accepted_count = 0
        self.connections = 0
        self.commands: list[str] = []  # every command line, in order, for protocol assertions
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # --- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Self:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._bind())
            except BaseException as e:
                errors.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_until_complete(self._serve_until_stopped())
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=f"smtpsink-{self.host}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("SMTP sink did not start")
        if errors:
            raise errors[0]
        return self

    async def _bind(self) -> None:
        self._stopped = asyncio.Event()
        if self.requested_host is not None:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        else:
            for n in range(_FIRST_HOST, _LAST_HOST + 1):  # bounded by the /24 range
                host = str(ipaddress.IPv4Address(n))
                try:
                    self._server = await asyncio.start_server(self._handle, host, self.port)
                except OSError as e:
                    if e.errno == errno.EADDRINUSE:
                        continue
                    raise
                self.host = host
                break
            else:
                raise OSError(errno.EADDRINUSE, f"no free loopback address for port {self.port}")
        if self.port == 0 and self._server is not None:
            self.port = int(self._server.sockets[0].getsockname()[1])

    async def _serve_until_stopped(self) -> None:
        assert self._stopped is not None
        await self._stopped.wait()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def stop(self) -> None:
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop already gone
                loop.call_soon_threadsafe(stopped.set)
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # --- waiting --------------------------------------------------------------------------

    def accepted(self) -> list[Transaction]:
        return [t for t in list(self.transactions) if t.is_accepted]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Transaction]:
        """Block until `count` transactions were accepted; raise TimeoutError after `timeout`."""
        try:
            [done] = wait_for(lambda: self._accepted_at_least(count), timeout)
            return done
        except TimeoutError:
            raise TimeoutError(self._short_of(count)) from None

    async def wait_for_async(self, count: int, timeout: float = 10.0) -> list[Transaction]:
        """Like wait_for, for a test whose event loop must keep running meanwhile."""
        try:
            [done] = await wait_for_async(lambda: self._accepted_at_least(count), timeout)
            return done
        except TimeoutError:
            raise TimeoutError(self._short_of(count)) from None

    def _accepted_at_least(self, count: int) -> tuple[list[Transaction]] | None:
        # Wrapped in a tuple: an empty list is an answer too (count 0), not "not yet".
        done = self.accepted()
        return (done,) if len(done) >= count else None

    def _short_of(self, count: int) -> str:
        return f"{self.host}: {len(self.accepted())} of {count} transactions"

    # --- the protocol ---------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            await self._session(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except ssl.SSLError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        b = self.behaviour

        async def reply(line: str) -> None:
            writer.write(line.encode("utf-8") + b"\r\n")
            await writer.drain()

        await reply(b.greeting.format(host=self.hostname))
        if not b.greeting.startswith("2"):
            # RFC 5321 §3.1: a 554 greeting; the server waits for QUIT.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader.readline(), 5)
            await reply("221 2.0.0 Bye")
            return
        is_tls = False
        helo = ""
        mail_from: str | None = None
        mail_params: tuple[str, ...] = ()
        rcpts: list[str] = []
        rcpt_params: dict[str, tuple[str, ...]] = {}
        done = 0  # transactions that reached the end of DATA on this connection
        for _ in range(100_000):  # bounded: a session of at most 100 000 commands
            raw = await reader.readline()
            if not raw:
                return
            if len(raw) > _MAX_LINE:
                await reply("500 5.5.2 Line too long")
                continue
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            self.commands.append(line)
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            if verb in ("EHLO", "HELO"):
                if not b.ehlo.startswith("2"):
                    await reply(b.ehlo)
                    continue
                helo = arg.strip()
                mail_from, rcpts, rcpt_params = None, [], {}
                if verb == "HELO":
                    await reply(f"250 {self.hostname}")
                    continue
                caps = [self.hostname, "ENHANCEDSTATUSCODES", "SIZE 104857600"]
                if b.pipelining:
                    caps.append("PIPELINING")
                if b.eightbitmime:
                    caps.append("8BITMIME")
                if b.smtputf8:
                    caps.append("SMTPUTF8")
                if b.dsn:
                    caps.append("DSN")
                if b.starttls and self.tls is not None and not is_tls:
                    caps.append("STARTTLS")
                if b.requiretls and is_tls:
                    caps.append("REQUIRETLS")
                lines = [f"250-{c}" for c in caps[:-1]] + [f"250 {caps[-1]}"]
                writer.write(("\r\n".join(lines) + "\r\n").encode())
                await writer.drain()
            elif verb == "STARTTLS":
                if not (b.starttls and self.tls is not None) or is_tls:
                    await reply("502 5.5.1 STARTTLS not available")
                    continue
                await reply("220 2.0.0 Ready to start TLS")
                await writer.start_tls(self.tls)
                is_tls = True
                helo, mail_from, rcpts, rcpt_params = "", None, [], {}
            elif verb == "MAIL":
                if b.hang_up_on_mail_after is not None and done >= b.hang_up_on_mail_after:
                    return
                path, params = _path_and_params(arg, "FROM:")
                if path is None:
                    await reply("501 5.5.4 Syntax error")
                    continue
                if not b.mail.startswith("2"):
                    await reply(b.mail)
                    continue
                mail_from, mail_params, rcpts, rcpt_params = path, params, [], {}
                await reply(b.mail)
            elif verb == "RCPT":
                if mail_from is None:
                    await reply("503 5.5.1 Need MAIL first")
                    continue
                path, params = _path_and_params(arg, "TO:")
                if path is None:
                    await reply("501 5.5.4 Syntax error")
                    continue
                answer = b.rcpt_for.get(path.lower(), b.rcpt)
                if answer.startswith("2"):
                    rcpts.append(path)
                    rcpt_params[path] = params
                await reply(answer)
            elif verb == "DATA":
                if mail_from is None or not rcpts:
                    await reply("503 5.5.1 Need RCPT first")
                    continue
                await reply(b.data)
                if not b.data.startswith("3"):
                    continue
                data = await _read_data(reader)
                if b.hang_up_after_data or b.hold_end_of_data:
                    self._record(helo, mail_from, mail_params, rcpts, rcpt_params, data, is_tls, "")
                    if b.hold_end_of_data:
                        for _ in range(100_000):  # bounded; ends at EOF when the client goes
                            if not await reader.read(65536):
                                break
                    return
                answer = b.end_of_data
                self._record(helo, mail_from, mail_params, rcpts, rcpt_params, data, is_tls, answer)
                mail_from, rcpts, rcpt_params = None, [], {}
                done += 1
                await reply(answer)
            elif verb == "RSET":
                mail_from, rcpts, rcpt_params = None, [], {}
                await reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                await reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                await reply("221 2.0.0 Bye")
                return
            else:
                await reply("500 5.5.1 Command unrecognized")

    def _record(
        self,
        helo: str,
        mail_from: str,
        mail_params: tuple[str, ...],
        rcpts: list[str],
        rcpt_params: dict[str, tuple[str, ...]],
        raw: bytes,
        is_tls: bool,
        answer: str,
    ) -> None:
        if answer.startswith("2"):
            self.accepted_count += 1
        if self.count_only:
            return
        self.transactions.append(
            Transaction(
                helo=helo,
                mail_from=mail_from,
                mail_params=mail_params,
                rcpt_to=tuple(rcpts),
                rcpt_params=dict(rcpt_params),
                raw=raw,
                message=unstuff(raw),
                tls=is_tls,
                reply=answer,
            )
        )


def _path_and_params(arg: str, prefix: str) -> tuple[str | None, tuple[str, ...]]:
    """'FROM:<a@b> BODY=8BITMIME' -> ('a@b', ('BODY=8BITMIME',)); None when malformed."""
    arg = arg.strip()
    if not arg.upper().startswith(prefix):
        return None, ()
    rest = arg[len(prefix) :].strip()
    if not rest.startswith("<") or ">" not in rest:
        return None, ()
    path, _, params = rest[1:].partition(">")
    return path, tuple(params.split())


async def _read_data(reader: asyncio.StreamReader) -> bytes:
    """The raw DATA bytes up to the CRLF.CRLF terminator (excluded), as on the wire."""
    chunks: list[bytes] = []
    size = 0
    while size <= _MAX_DATA:  # bounded by the size cap
        line = await reader.readuntil(b"\r\n")
        if line == b".\r\n":
            return b"".join(chunks)
        chunks.append(line)
        size += len(line)
    raise ConnectionError("message too big for the sink")


def unstuff(raw: bytes) -> bytes:
    """RFC 5321 §4.5.2: drop the first dot of every line that starts with one."""
    lines = raw.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def self_signed_context(folder: Path, hostname: str = "sink.test") -> ssl.SSLContext:
    """A server SSLContext with a fresh self-signed certificate written to `folder`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "sink-cert.pem", folder / "sink-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


def main() -> None:
    """Run one sink in the foreground until SIGTERM/SIGINT; print the accepted count at exit."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=10026)
    parser.add_argument("--count-only", action="store_true")
    args = parser.parse_args()
    sink = SmtpSink(args.host, args.port, count_only=args.count_only)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    sink.start()
    print(f"listening {sink.host}:{sink.port}", flush=True)
    done.wait()
    sink.stop()
    print(f"accepted {sink.accepted_count}", flush=True)


if __name__ == "__main__":
    main()

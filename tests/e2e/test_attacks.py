"""Protocol attacks of issue #6 against a live `mailgate serve`, each with the exact answer.

SMTP smuggling (every end-of-data look-alike of the 2023 SEC Consult research, and NUL tricks),
STARTTLS command injection (CVE-2011-0411), header injection through envelope parameters, AUTH
line overflow, 8-bit and NUL octets in commands, the error cap, a slowloris client, and a client
that never reads its replies. All on loopback; timeouts are set small so that the whole module
takes seconds. `Client` is a raw socket client that reads whole (multi-line) replies, so a test
sees every byte the server sends, including anything it should not have sent.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate import replies
from mailgate.message import headers
from mailgate.replies import Reply
from tests.e2e.conftest import ALICE, client_tls
from tests.support.gateway import HOSTNAME, Gateway
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

TIMEOUT = 2  # limits.command_timeout and data_timeout of this module's server, seconds
CRLF = b"\r\n"


class Client:
    """One raw SMTP connection from `source` (a 127.0.0.0/8 address), optionally TLS."""

    def __init__(self, port: int, *, source: str = "127.0.0.1", tls: bool = False,
                 greet: bool = True, timeout: float = 10.0) -> None:  # fmt: skip
        sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
        )
        if tls:
            sock = client_tls().wrap_socket(sock, server_hostname=HOSTNAME)
        self.sock: socket.socket = sock
        self.buf = b""
        self.greeting = self.reply() if greet else b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: bytes) -> bytes:
        self.send(line + CRLF)
        return self.reply()

    def reply(self) -> bytes:
        """The next complete reply, all its lines; what is left (maybe b"") at end of stream."""
        for _ in range(100_000):  # bounded: each round reads at least one byte or returns
            end = _reply_end(self.buf)
            if end:
                out, self.buf = self.buf[:end], self.buf[end:]
                return out
            chunk = self.sock.recv(65536)
            if not chunk:
                out, self.buf = self.buf, b""
                return out
            self.buf += chunk
        raise AssertionError("reply never ended")

    def rest(self, timeout: float = 5.0) -> bytes | None:
        """Everything the server still sends before it closes; None if it does not close."""
        self.sock.settimeout(timeout)
        data, self.buf = self.buf, b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk
        return None

    def starttls(self) -> None:
        assert self.cmd(b"STARTTLS") == replies.READY_FOR_TLS.to_bytes()
        self.sock = client_tls().wrap_socket(self.sock, server_hostname=HOSTNAME)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _reply_end(buf: bytes) -> int:
    """Offset just past the last line of the first complete reply in `buf`, or 0."""
    start = 0
    while (lf := buf.find(b"\n", start)) >= 0:
        line = buf[start:lf]
        if len(line) < 4 or line[3:4] != b"-":
            return lf + 1
        start = lf + 1
    return 0


def line(reply: Reply) -> bytes:
    return reply.to_bytes()


@contextlib.contextmanager
def connect(port: int, **kwargs: object) -> Iterator[Client]:
    client = Client(port, **kwargs)  # type: ignore[arg-type]  # keyword pass-through
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = Gateway(
        tmp_path_factory.mktemp("attacks") / "gw",
        {"limits": {"command_timeout": TIMEOUT, "data_timeout": TIMEOUT}},
    )
    gateway.add_user(*ALICE)
    gateway.start("--no-delivery")
    try:
        yield gateway
    finally:
        gateway.finish()


def open_data(client: Client) -> None:
    """EHLO, MAIL, RCPT, DATA on the smart host (127.0.0.0/8 may relay)."""
    assert client.cmd(b"EHLO lab.test").startswith(b"250-" + HOSTNAME.encode())
    assert client.cmd(b"MAIL FROM:<cron@lab.test>") == line(replies.SENDER_OK)
    assert client.cmd(b"RCPT TO:<ops@remote.test>") == line(replies.RECIPIENT_OK)
    assert client.cmd(b"DATA") == line(replies.START_DATA)


# --- SMTP smuggling ----------------------------------------------------------------------

# What a smuggler appends after the fake end of data: a second, forged transaction.
SMUGGLED = (
    b"MAIL FROM:<ceo@example.org>\r\nRCPT TO:<victim@remote.test>\r\nDATA\r\n"
    b"From: ceo@example.org\r\nSubject: smuggled\r\n\r\npay now\r\n.\r\n"
)
# Every end-of-data look-alike of SEC Consult's "SMTP Smuggling" (2023) and the NUL variants:
# (id, fake end, the reply that must come back before the close).
VARIANTS = [
    ("LF.LF", b"\n.\n", replies.SMUGGLING),
    ("LF.CRLF", b"\n.\r\n", replies.SMUGGLING),
    ("CRLF.LF", b"\r\n.\n", replies.SMUGGLING),
    ("CR.CR", b"\r.\r", replies.SMUGGLING),
    ("CRLF.CR", b"\r\n.\r", replies.SMUGGLING),
    ("CR.CRLF", b"\r.\r\n", replies.SMUGGLING),
    ("LF.CR", b"\n.\r", replies.SMUGGLING),
    ("CR.LF", b"\r.\n", replies.SMUGGLING),
    ("CRLF.NUL-CRLF", b"\r\n.\x00\r\n", replies.NUL_IN_DATA),
    ("CRLF-NUL.CRLF", b"\r\n\x00.\r\n", replies.NUL_IN_DATA),
    ("NUL-CRLF.CRLF", b"\x00\r\n.\r\n", replies.NUL_IN_DATA),
]


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "split-at-fake-end"])
@pytest.mark.parametrize(("fake_end", "reply"), [(v, r) for _, v, r in VARIANTS],
                         ids=[name for name, _, _ in VARIANTS])  # fmt: skip
def test_smuggling_end_of_data_variants_are_refused(
    gw: Gateway, fake_end: bytes, reply: Reply, split: bool
) -> None:
    before = set(gw.queued())
    with connect(gw.ports["smarthost"]) as c:
        open_data(c)
        head = b"From: cron@lab.test\r\nSubject: report\r\n\r\nall good"
        rest = fake_end + SMUGGLED + b"\r\n.\r\n"
        if split:  # the fake end arrives in pieces: the reader must not be fooled across reads
            for piece in (head + rest[:1], rest[1:2], rest[2:]):
                c.send(piece)
                # The server may refuse at the first bare LF; sending on would reset the
                # connection and could lose its reply, so stop once it has answered.
                if select.select([c.sock], [], [], 0.1)[0]:
                    break
        else:
            c.send(head + rest)
        assert c.reply() == line(reply)
        assert c.rest() == b"", "nothing more may be answered, and the server must close"
    assert set(gw.queued()) == before


def test_a_real_end_of_data_with_pipelined_commands_is_two_messages(gw: Gateway) -> None:
    """The control: the same bytes with a proper CRLF.CRLF are two honest transactions."""
    before = set(gw.queued())
    with connect(gw.ports["smarthost"]) as c:
        open_data(c)
        c.send(b"Subject: report\r\n\r\nall good\r\n.\r\n" + SMUGGLED)
        first = c.reply()
        assert first.startswith(b"250 2.0.0 Ok: queued as "), first
        assert c.reply() == line(replies.SENDER_OK)
        assert c.reply() == line(replies.RECIPIENT_OK)
        assert c.reply() == line(replies.START_DATA)
        assert c.reply().startswith(b"250 2.0.0 Ok: queued as ")
        c.cmd(b"QUIT")
    assert len(set(gw.queued()) - before) == 2


# --- STARTTLS injection (CVE-2011-0411) -----------------------------------------------------


@pytest.mark.parametrize("service", ["submission", "smarthost"])
def test_starttls_with_pipelined_plaintext_is_refused(gw: Gateway, service: str) -> None:
    with connect(gw.ports[service]) as c:
        c.cmd(b"EHLO client.test")
        c.send(b"STARTTLS\r\nMAIL FROM:<x@lab.test>\r\n")
        assert c.reply() == line(replies.PIPELINED_STARTTLS)
        assert c.rest() == b""


def test_plaintext_sent_before_the_220_is_never_executed(gw: Gateway) -> None:
    """Injected bytes in a second write, racing the 220: whichever wins, they are not run."""
    with connect(gw.ports["submission"]) as c:
        c.cmd(b"EHLO client.test")
        c.send(b"STARTTLS\r\n")
        c.send(b"RSET\r\n")
        got = c.reply()
        if got == line(replies.READY_FOR_TLS):
            # The 220 went out before RSET arrived: the machine refuses the plaintext, or the
            # TLS layer takes it for a broken ClientHello and drops the connection.
            got = c.reply()
            assert got in (line(replies.PIPELINED_STARTTLS), b""), got
        else:
            assert got == line(replies.PIPELINED_STARTTLS)
        assert c.rest() == b""


def test_tls_session_starts_clean_after_starttls(gw: Gateway) -> None:
    """RFC 3207 §4.2: the TLS session forgets EHLO; MAIL before a new EHLO is out of order."""
    with connect(gw.ports["smarthost"]) as c:
        c.cmd(b"EHLO client.test")
        c.starttls()
        assert c.cmd(b"MAIL FROM:<x@lab.test>") == line(replies.BAD_SEQUENCE)


# --- header injection through envelope parameters ---------------------------------------------


@pytest.mark.parametrize(
    ("mail", "rcpt"),
    [
        (b"MAIL FROM:<cron@lab.test> ENVID=x+0D+0AX-Injected:+yes", None),
        (b"MAIL FROM:<cron@lab.test> ENVID=x+0AX-Injected:+yes", None),
        (b"MAIL FROM:<cron@lab.test> ENVID=x+00y", None),
        (b"MAIL FROM:<cron@lab.test> AUTH=x+0D+0AX-Injected:+1", None),
        (b"MAIL FROM:<cron@lab.test>",
         b"RCPT TO:<ops@remote.test> ORCPT=rfc822;ops+0D+0AX-Injected:+yes@remote.test"),
        (b"MAIL FROM:<cron@lab.test>", b"RCPT TO:<ops@remote.test> ORCPT=rfc822;a+0Db"),
    ],
    ids=["envid-crlf", "envid-lf", "envid-nul", "auth-crlf", "orcpt-crlf", "orcpt-cr"],
)  # fmt: skip
def test_encoded_line_breaks_in_envelope_parameters_are_501(
    gw: Gateway, mail: bytes, rcpt: bytes | None
) -> None:
    with connect(gw.ports["smarthost"]) as c:
        c.cmd(b"EHLO lab.test")
        if rcpt is None:
            assert c.cmd(mail) == line(replies.BAD_ARGUMENTS)
        else:
            assert c.cmd(mail) == line(replies.SENDER_OK)
            assert c.cmd(rcpt) == line(replies.BAD_ARGUMENTS)
        assert c.cmd(b"NOOP") == line(replies.NOOP_OK)  # the session goes on


def test_accepted_envelope_parameters_never_become_header_lines(gw: Gateway) -> None:
    with connect(gw.ports["smarthost"]) as c:
        # A HELO name is taken liberally, but it may not break out of the Received: comment.
        assert c.cmd(b"EHLO lab.test)(X-Injected:").startswith(b"250-")
        assert c.cmd(b"MAIL FROM:<cron@lab.test> RET=HDRS ENVID=X-Injected:+2Byes") == line(
            replies.SENDER_OK
        )
        rcpt = (
            b"RCPT TO:<ops@remote.test> NOTIFY=FAILURE ORCPT=rfc822;X-Injected:+2Bops@remote.test"
        )
        assert c.cmd(rcpt) == line(replies.RECIPIENT_OK)
        assert c.cmd(b"DATA") == line(replies.START_DATA)
        got = c.cmd(b"Subject: report\r\n\r\nbody\r\n.")
        assert got.startswith(b"250 2.0.0 Ok: queued as "), got
        qid = got.split(b"queued as ")[1].strip().decode()
    envelope = gw.envelope(qid)
    assert envelope.envid == "X-Injected:+yes"
    assert envelope.recipients[0].orcpt == "rfc822;X-Injected:+ops@remote.test"
    block = headers.parse(gw.message(qid)).raw
    names = [f.key for f in headers.parse(block).fields]
    assert names == ["received", "x-scanned-by", "subject"], names
    for raw in block.split(CRLF)[1:]:
        assert not raw.lower().startswith(b"x-injected"), block


# --- AUTH line overflow ----------------------------------------------------------------------


def test_auth_line_overflow_is_refused_and_the_session_survives(gw: Gateway) -> None:
    with connect(gw.ports["submissions"], tls=True) as c:
        c.cmd(b"EHLO client.test")
        assert c.cmd(b"AUTH PLAIN " + b"A" * 20_000) == line(replies.AUTH_LINE_TOO_LONG)
        assert c.cmd(b"AUTH PLAIN") == b"334 \r\n"
        assert c.cmd(b"A" * 20_000) == line(replies.AUTH_LINE_TOO_LONG)
        assert c.cmd(b"NOOP") == line(replies.NOOP_OK)
        # and the exchange still works for an honest client afterwards
        assert c.cmd(b"AUTH PLAIN AGFsaWNlAGNvcnJlY3QgaG9yc2UgYmF0dGVyeQ==") == line(
            replies.AUTH_SUCCEEDED
        )


def test_endless_command_line_is_answered_once_and_discarded(gw: Gateway) -> None:
    with connect(gw.ports["smarthost"]) as c:
        c.send(b"EHLO " + b"x" * 1_000_000)  # a megabyte without a line end
        assert c.reply() == line(replies.LINE_TOO_LONG)
        c.send(b"x" * 100_000 + CRLF)  # the rest of that line is dropped, never answered
        assert c.cmd(b"NOOP") == line(replies.NOOP_OK)


# --- 8-bit and NUL in commands ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        (b"EHLO a\x00b.test", replies.SYNTAX_ERROR),
        (b"\x00EHLO a.test", replies.SYNTAX_ERROR),
        (b"\xc3\x89HLO a.test", replies.SYNTAX_ERROR),
        (b"EH\xffLO a.test", replies.SYNTAX_ERROR),
        (b"NOOP\rRSET", replies.SYNTAX_ERROR),
        (b"MAIL FROM:<cron@lab.test>\x00", replies.SYNTAX_ERROR),
        (b"MAIL FROM:<cr\x00on@lab.test>", replies.SYNTAX_ERROR),
        (b"MAIL FROM:<\xe9t\xe9@lab.test>", replies.UTF8_NOT_REQUESTED),
        (b"MAIL FROM:<\xc3\xa9t\xc3\xa9@lab.test>", replies.UTF8_NOT_REQUESTED),
        (b"MAIL FROM:<\xff\xfe@lab.test> SMTPUTF8", replies.BAD_ADDRESS),
    ],
    ids=["nul-in-arg", "nul-first", "utf8-verb", "8bit-verb", "bare-cr", "nul-after-path",
         "nul-in-path", "latin1-path", "utf8-path-without-smtputf8", "invalid-utf8-smtputf8"],
)  # fmt: skip
def test_8bit_and_nul_in_commands(gw: Gateway, command: bytes, reply: Reply) -> None:
    with connect(gw.ports["smarthost"]) as c:
        c.cmd(b"EHLO lab.test")
        assert c.cmd(command) == line(reply)
        assert c.cmd(b"NOOP") == line(replies.NOOP_OK)


def test_bare_lf_command_line_is_refused(gw: Gateway) -> None:
    with connect(gw.ports["smarthost"]) as c:
        c.send(b"NOOP\n")
        assert c.reply() == line(replies.SYNTAX_ERROR)
        assert c.cmd(b"NOOP") == line(replies.NOOP_OK)


def test_error_cap_ends_the_session_with_421(gw: Gateway) -> None:
    with connect(gw.ports["smarthost"]) as c:
        for _ in range(9):  # limits.max_errors = 10 by default
            assert c.cmd(b"\xffXYZ") == line(replies.SYNTAX_ERROR)
        assert c.cmd(b"\xffXYZ") == line(replies.SYNTAX_ERROR)
        assert c.reply() == line(replies.TOO_MANY_ERRORS)
        assert c.rest() == b""


# --- slowloris and clients that never read ----------------------------------------------------


def _dribble(c: Client, data: bytes, interval: float) -> float:
    """Send `data` a byte at a time every `interval` s until the server says something; return
    the seconds that took. Bounded by len(data)."""
    start = time.monotonic()
    for i in range(len(data)):
        try:
            c.send(data[i : i + 1])
        except (BrokenPipeError, ConnectionResetError):
            break
        readable, _, _ = select.select([c.sock], [], [], interval)
        if readable:
            break
    return time.monotonic() - start


@pytest.mark.parametrize("phase", ["command", "data"])
def test_slowloris_is_cut_off_by_the_timeout(gw: Gateway, phase: str) -> None:
    with connect(gw.ports["smarthost"]) as c:
        if phase == "data":
            open_data(c)
        # 40 bytes at 0.25 s each would take 10 s; every byte arrives well within the timeout.
        data = b"EHLO slow-client.lab.test.example.org\r\n" if phase == "command" else (
            b"Subject: " + b"s" * 29 + b"\r\n"
        )  # fmt: skip
        elapsed = _dribble(c, data, 0.25)
        assert c.reply() == line(replies.TIMEOUT)
        assert c.rest() == b""
    # Not cut off before the timeout although every byte came late; the TIMEOUT reply above
    # (rather than a 250 after the 10 s of dribbling) shows it was cut off at the timeout.
    assert elapsed >= TIMEOUT - 0.5, elapsed


def _tree_rss_kib(pid: int) -> int:
    """Resident memory of `pid` and its descendants (mailgate serve may fork workers)."""
    total, todo, seen = 0, [pid], set[int]()
    while todo and len(seen) < 1000:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        with contextlib.suppress(OSError):
            for text in Path(f"/proc/{p}/status").read_text().splitlines():
                if text.startswith("VmRSS:"):
                    total += int(text.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return total


def test_client_that_never_reads_is_reset_and_memory_stays_bounded(gw: Gateway) -> None:
    assert gw.proc is not None
    rss_before = _tree_rss_kib(gw.proc.pid)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # we never read: keep it small
    sock.bind(("127.0.0.50", 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", gw.ports["smarthost"]))
    try:
        sock.setblocking(False)
        noops = b"NOOP\r\n" * 10_000
        sent, reset = 0, False
        deadline = time.monotonic() + TIMEOUT + 15
        while time.monotonic() < deadline and sent < 256 * 1024 * 1024:
            _, writable, _ = select.select([], [sock], [], 0.2)
            if not writable:
                continue
            try:
                sent += sock.send(noops)
            except (ConnectionResetError, BrokenPipeError):
                reset = True
                break
            except BlockingIOError:
                continue
        assert reset, f"the server kept the connection after {sent} bytes of NOOPs"
        assert sent > 100_000  # thousands of NOOPs went out before the server gave up
    finally:
        sock.close()
    growth_mib = (_tree_rss_kib(gw.proc.pid) - rss_before) / 1024
    assert growth_mib < 64, growth_mib
    with connect(gw.ports["smarthost"]) as c:  # and the server still serves everyone else
        assert c.greeting.startswith(b"220 ")
    wait_for(lambda: "connection lost" in gw.log_text(), timeout=5, what="the session's end")

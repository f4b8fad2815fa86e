"""Scanner.check against a real clamd (tests/support/clamd.py), over TCP and a Unix socket.

Covers issue #4's list: EICAR plain, base64 in an attachment, inside a zip, inside a forwarded
message/rfc822; a zipped .exe accepted; clean mail with PDFs and images accepted; blocked
types refused before clamd is asked; clamd stopped -> ScannerUnavailable (451 4.7.1 at the
accept boundary); a MIME bomb refused quickly; the size rule; one log line per verdict.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import zipfile
from collections.abc import Iterator
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import pytest

from mailgate import replies
from mailgate.config import ScannerConfig
from mailgate.errors import Rejected, ScannerUnavailable
from mailgate.scan import Scanner, Verdict
from mailgate.scan.clamd import ClamdAddress, ClamdClient
from tests.support.clamd import EICAR, EICAR_FOUND_NAME, ClamdHandle, running_clamd

PE = b"MZ" + b"\x90" * 58 + (0x80).to_bytes(4, "little") + b"\0" * 0x40 + b"PE\0\0" + b"\0" * 200
PDF = b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x02\0\0\0\x90wS\xde"
JPEG = b"\xff\xd8\xff\xe0\0\x10JFIF\0\x01\x01\0\0\x01\0\x01\0\0\xff\xd9"
CLEAN_HEADER = re.compile(r"mailgate \(clamd ClamAV \d+\.\d+[^()]*\) ; clean")
VIRUS = replies.virus_found(EICAR_FOUND_NAME)


def new_message(text: str = "Hello,\n\nsee attached.\n") -> EmailMessage:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = "alice@example.org"
    msg["To"] = "bob@example.net"
    msg["Subject"] = "test"
    msg.set_content(text)
    return msg


def with_attachment(
    data: bytes, filename: str, maintype: str = "application", subtype: str = "octet-stream"
) -> bytes:
    msg = new_message()
    msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes()


def zip_of(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return buf.getvalue()


def check(scanner: Scanner, message: bytes, log_prefix: str = "") -> Verdict:
    return asyncio.run(scanner.check(message, log_prefix=log_prefix))


def refused(scanner: Scanner, message: bytes) -> Rejected:
    with pytest.raises(Rejected) as info:
        check(scanner, message)
    return info.value


@pytest.fixture
def scanner(clamd_spec: str) -> Scanner:
    return Scanner(ScannerConfig(clamd=clamd_spec, timeout=10.0))


# --- viruses ---------------------------------------------------------------------------


def test_eicar_in_the_plain_body(scanner: Scanner) -> None:
    msg = b"From: alice@example.org\r\nSubject: t\r\n\r\n" + EICAR + b"\r\n"
    assert refused(scanner, msg).reply == VIRUS
    assert VIRUS.line() == f"554 5.7.1 Message rejected: virus found ({EICAR_FOUND_NAME})"


def test_eicar_base64_in_an_attachment(scanner: Scanner) -> None:
    msg = with_attachment(EICAR, "eicar.txt", "text", "plain")
    assert b"Content-Transfer-Encoding: base64" in msg and EICAR not in msg
    assert refused(scanner, msg).reply == VIRUS


def test_eicar_inside_a_zip(scanner: Scanner) -> None:
    msg = with_attachment(zip_of("eicar.com", EICAR), "files.zip", "application", "zip")
    assert refused(scanner, msg).reply == VIRUS


def test_eicar_inside_a_forwarded_message(scanner: Scanner) -> None:
    inner = EmailMessage(policy=SMTP)
    inner["From"] = "carol@example.net"
    inner["Subject"] = "original"
    inner.set_content("original text")
    inner.add_attachment(EICAR, maintype="application", subtype="octet-stream", filename="x.bin")
    outer = new_message("Forwarding this.\n")
    outer.add_attachment(inner)  # message/rfc822
    msg = outer.as_bytes()
    assert b"Content-Type: message/rfc822" in msg
    assert refused(scanner, msg).reply == VIRUS


def test_eicar_after_many_chunks_of_a_large_message(clamd: ClamdHandle) -> None:
    # 3 MB with small chunks: the verdict depends on every chunk reaching clamd.
    client = ClamdClient(
        ClamdAddress.parse(clamd.unix_spec), timeout=10, connect_timeout=2, chunk_size=4096
    )
    data = b"a harmless line of text\r\n" * 120_000 + EICAR + b"\r\n"
    result = asyncio.run(client.instream(memoryview(data)))
    assert result.virus == EICAR_FOUND_NAME


# --- accepted ----------------------------------------------------------------------------


def test_zipped_exe_is_accepted(scanner: Scanner) -> None:
    msg = with_attachment(zip_of("setup.exe", PE), "setup.zip", "application", "zip")
    assert CLEAN_HEADER.fullmatch(check(scanner, msg).header)


def test_clean_mail_with_pdfs_and_images_is_accepted(scanner: Scanner) -> None:
    msg = new_message()
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="report.pdf")
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="annex.pdf")
    msg.add_attachment(PNG, maintype="image", subtype="png", filename="chart.png")
    msg.add_attachment(JPEG, maintype="image", subtype="jpeg", filename="photo.jpg")
    verdict = check(scanner, msg.as_bytes())
    assert CLEAN_HEADER.fullmatch(verdict.header)
    assert verdict.header.isascii() and "\r" not in verdict.header and "\n" not in verdict.header


def test_many_concurrent_checks(scanner: Scanner) -> None:
    msgs = [with_attachment(PDF, f"r{i}.pdf", "application", "pdf") for i in range(20)]

    async def all_of_them() -> list[Verdict]:
        return await asyncio.gather(*(scanner.check(m) for m in msgs))

    assert all(CLEAN_HEADER.fullmatch(v.header) for v in asyncio.run(all_of_them()))


def test_without_clamd_only_file_types_are_checked() -> None:
    scanner = Scanner(ScannerConfig(clamd=""))
    msg = b"From: a@example.org\r\n\r\n" + EICAR + b"\r\n"
    assert check(scanner, msg) == Verdict("mailgate (file types only) ; clean")
    assert refused(scanner, with_attachment(b"x", "a.exe")).reply == replies.blocked_file("a.exe")


# --- order: file types before clamd ---------------------------------------------------------


@pytest.fixture
def stopped_clamd(tmp_path: Path) -> ClamdHandle:
    with running_clamd(tmp_path) as handle:
        handle.stop()
    return handle


def test_blocked_type_is_refused_without_asking_clamd(stopped_clamd: ClamdHandle) -> None:
    scanner = Scanner(ScannerConfig(clamd=stopped_clamd.tcp_spec, timeout=5.0))
    msg = with_attachment(b"MZ", "invoice.pdf.exe")
    error = refused(scanner, msg)
    assert error.reply == replies.blocked_file("invoice.pdf.exe")
    assert (error.reply.code, error.reply.status) == (554, "5.7.1")


def test_mime_bomb_is_refused_without_asking_clamd(stopped_clamd: ClamdHandle) -> None:
    # (bench/bench_mime_bombs.py measures how fast: a clock bound here would be flaky.)
    scanner = Scanner(ScannerConfig(clamd=stopped_clamd.unix_spec, timeout=5.0))
    layers = 10_000
    bomb = b"From: a@example.org\r\nMIME-Version: 1.0\r\n" + b"".join(
        b'Content-Type: multipart/mixed; boundary="n%d"\r\n\r\n--n%d\r\n' % (i, i)
        for i in range(layers)
    )
    error = refused(scanner, bomb)  # clamd is stopped: asking it would give 451 4.7.1
    assert error.reply == replies.BAD_MIME
    assert (error.reply.code, error.reply.status) == (554, "5.6.0")


# --- clamd unavailable ------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_clamd_stopped_is_unavailable(stopped_clamd: ClamdHandle, transport: str) -> None:
    spec = stopped_clamd.tcp_spec if transport == "tcp" else stopped_clamd.unix_spec
    scanner = Scanner(ScannerConfig(clamd=spec, timeout=5.0, connect_timeout=2.0))
    with pytest.raises(ScannerUnavailable):
        check(scanner, new_message().as_bytes())
    assert replies.SCANNER_UNAVAILABLE.line().startswith("451 4.7.1 ")


def test_clamd_stopped_while_running(tmp_path: Path) -> None:
    with running_clamd(tmp_path) as handle:
        scanner = Scanner(ScannerConfig(clamd=handle.tcp_spec, timeout=5.0))
        assert CLEAN_HEADER.fullmatch(check(scanner, new_message().as_bytes()).header)
        handle.stop()
        assert not handle.is_running
        with pytest.raises(ScannerUnavailable):
            check(scanner, new_message().as_bytes())


# --- size -------------------------------------------------------------------------------------

SMALL_LIMIT = 1024 * 1024


@pytest.fixture(scope="module")
def small_clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClamdHandle]:
    with running_clamd(tmp_path_factory.mktemp("small"), stream_max_length=SMALL_LIMIT) as handle:
        yield handle


def sized(total: int) -> bytes:
    head = b"From: a@example.org\r\nSubject: big\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    body = line * ((total - len(head)) // len(line))
    body += b"y" * (total - len(head) - len(body))
    assert len(head + body) == total
    return head + body


def test_message_of_exactly_max_stream_size_is_scanned(small_clamd: ClamdHandle) -> None:
    scanner = Scanner(ScannerConfig(clamd=small_clamd.tcp_spec, max_stream_size=SMALL_LIMIT))
    assert CLEAN_HEADER.fullmatch(check(scanner, sized(SMALL_LIMIT)).header)


def test_message_over_max_stream_size_is_refused_permanently(small_clamd: ClamdHandle) -> None:
    scanner = Scanner(ScannerConfig(clamd=small_clamd.tcp_spec, max_stream_size=SMALL_LIMIT))
    error = refused(scanner, sized(SMALL_LIMIT + 1))
    assert error.reply == replies.too_big_to_scan(SMALL_LIMIT)
    assert (
        error.reply.line() == "552 5.3.4 Message too big to scan for viruses (limit 1048576 bytes)"
    )


def test_clamd_limit_below_ours_is_unavailable_and_says_why(
    small_clamd: ClamdHandle, caplog: pytest.LogCaptureFixture
) -> None:
    scanner = Scanner(ScannerConfig(clamd=small_clamd.unix_spec, max_stream_size=4 * SMALL_LIMIT))
    caplog.set_level(logging.INFO, logger="mailgate.scan")
    with pytest.raises(ScannerUnavailable, match="StreamMaxLength"):
        check(scanner, sized(2 * SMALL_LIMIT))
    assert "verdict=unavailable" in caplog.text


# --- the log line -------------------------------------------------------------------------------


def test_one_log_line_per_verdict(scanner: Scanner, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailgate.scan")
    check(scanner, new_message().as_bytes(), log_prefix="qid=AAA")
    with pytest.raises(Rejected):
        check(scanner, b"From: a@example.org\r\n\r\n" + EICAR + b"\r\n", log_prefix="qid=BBB")
    with pytest.raises(Rejected):
        check(scanner, with_attachment(b"x", "run me.bat"), log_prefix="qid=CCC")
    lines = [r.getMessage() for r in caplog.records if r.name == "mailgate.scan"]
    assert len(lines) == 3
    assert re.fullmatch(r"qid=AAA scan verdict=clean name=- ms=\d+\.\d", lines[0])
    assert re.fullmatch(
        rf"qid=BBB scan verdict=virus name={re.escape(EICAR_FOUND_NAME)} ms=\d+\.\d", lines[1]
    )
    assert re.match(r"qid=CCC scan verdict=blocked name=run_me\.bat ms=\d+\.\d detail=", lines[2])

"""The whole path: scanning with a real clamd, DKIM signing, delivery to a recording sink."""

from __future__ import annotations

import base64
import io
import json
import smtplib
import zipfile
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

import dkim
from tests.e2e.conftest import ALICE, message, submission
from tests.support.clamd import EICAR, EICAR_FOUND_NAME, ClamdHandle, running_clamd
from tests.support.gateway import Gateway
from tests.support.smtpsink import SmtpSink


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink(host="127.0.0.1", port=0) as s:
        yield s


@pytest.fixture
def clamd(tmp_path: Path) -> Iterator[ClamdHandle]:
    with running_clamd(tmp_path) as handle:
        yield handle


@pytest.fixture
def gateway(tmp_path: Path, sink: SmtpSink, clamd: ClamdHandle) -> Iterator[Gateway]:
    gw = Gateway(tmp_path / "gw", {
        "delivery": {"relay": f"127.0.0.1:{sink.port}"},
        "scanner": {"clamd": clamd.tcp_spec},
    })  # fmt: skip
    gw.add_user(*ALICE)
    gw.start()
    try:
        yield gw
    finally:
        gw.finish()


def attachment_message(filename: str, payload: bytes, frm: str = "alice@example.org") -> bytes:
    msg = EmailMessage()
    msg["From"] = frm
    msg["To"] = "someone@remote.test"
    msg["Subject"] = "attachment"
    msg.set_content("See attached.\n")
    msg.add_attachment(payload, maintype="application", subtype="octet-stream",
                       filename=filename)  # fmt: skip
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def send_data(gw: Gateway, data: bytes, frm: str = "alice@example.org") -> tuple[int, bytes]:
    client = submission(gw)
    client.mail(frm)
    client.rcpt("someone@remote.test")
    code, text = client.data(data)
    client.quit()
    return code, text


def zipped(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(name, data)
    return buf.getvalue()


def test_clean_mail_is_scanned_stamped_and_delivered(gateway: Gateway, sink: SmtpSink) -> None:
    code, text = send_data(gateway, message(subject="clean"))
    assert code == 250, text
    [t] = sink.wait_for(1, timeout=20)
    assert t.mail_from == "alice@example.org"
    assert t.rcpt_to == ("someone@remote.test",)
    head = t.message.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nX-Scanned-By: " in head and b"clean" in head
    assert t.message.endswith(b"\r\n\r\nHello there.\r\n")


def test_eicar_attachment_refused_naming_the_virus(gateway: Gateway, sink: SmtpSink) -> None:
    code, text = send_data(gateway, attachment_message("readme.txt", EICAR))
    assert code == 554, text
    assert text.startswith(b"5.7.1 ") and EICAR_FOUND_NAME.split(".")[0].encode() in text
    assert gateway.queued() == []


def test_eicar_inside_zip_refused(gateway: Gateway) -> None:
    code, text = send_data(gateway, attachment_message("docs.zip", zipped("eicar.com", EICAR)))
    assert (code, text[:5]) == (554, b"5.7.1")


def test_blocked_extension_refused_with_zip_advice(gateway: Gateway) -> None:
    code, text = send_data(gateway, attachment_message("invoice.pdf.exe", b"harmless bytes"))
    assert (code, text[:5]) == (554, b"5.7.1")
    assert b"invoice.pdf.exe" in text and b"zip" in text
    assert gateway.queued() == []


def test_zipped_executable_is_accepted_and_delivered(gateway: Gateway, sink: SmtpSink) -> None:
    archive = zipped("tool.exe", b"MZ" + b"\0" * 200)  # once: a zip records the time
    code, text = send_data(gateway, attachment_message("tool.zip", archive))
    assert code == 250, text
    [t] = sink.wait_for(1, timeout=20)
    assert base64.b64encode(archive)[:40] in t.message.replace(b"\r\n", b"")


def test_clamd_down_gives_451_471(gateway: Gateway, clamd: ClamdHandle) -> None:
    clamd.stop()
    code, text = send_data(gateway, message(subject="while clamd is down"))
    assert (code, text[:5]) == (451, b"4.7.1")
    assert gateway.queued() == []


def dns_from(records: list[dict[str, Any]]) -> Any:
    txt = {r["name"].rstrip(".").lower(): "".join(r["strings"]).encode()
           for r in records if r["type"] == "TXT"}  # fmt: skip

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return txt.get(name.decode().rstrip(".").lower())

    return lookup


def test_managed_domain_mail_is_dkim_signed_and_verifies(gateway: Gateway, sink: SmtpSink) -> None:
    gateway.cli("domain", "add", "college.example.org", "--ed25519")
    gateway.cli("address", "add", "bursar@college.example.org", "--owner", "alice")
    records = json.loads(gateway.cli("domain", "dns", "college.example.org", "--json").stdout)
    code, text = send_data(gateway, message(frm="bursar@college.example.org", subject="fees"),
                           frm="bursar@college.example.org")  # fmt: skip
    assert code == 250, text
    [t] = sink.wait_for(1, timeout=20)
    assert t.message.startswith(b"DKIM-Signature: ")
    lookup = dns_from(records["records"])
    assert dkim.verify(t.message, dnsfunc=lookup)
    assert dkim.DKIM(t.message).verify(idx=1, dnsfunc=lookup)  # the Ed25519 signature too
    print(t.message.split(b"\r\n\r\n", 1)[0].decode())


def test_large_message_is_delivered_byte_for_byte_and_its_signature_verifies(
    gateway: Gateway, sink: SmtpSink
) -> None:
    # Spilled to disk, scanned by clamd in chunks, signed from a chunked body hash, delivered
    # in chunks: lines starting with "." (dot-stuffed twice on the way), trailing white space,
    # empty lines at the end, and an attachment.
    gateway.cli("domain", "add", "college.example.org", "--allow-network", "127.0.0.0/8")
    gateway.wait_directory(domains=1)  # no AUTH here to make the worker look again
    records = json.loads(gateway.cli("domain", "dns", "college.example.org", "--json").stdout)
    text = b"".join(b".line %d with a dot  \r\n\tand a tab\r\n" % i for i in range(60_000))
    big = attachment_message("data.bin", bytes(range(256)) * 12_000,
                             frm="bursar@college.example.org")  # fmt: skip
    original = big.replace(b"See attached.\r\n", b"See attached.\r\n" + text) + b"\r\n\r\n"
    assert len(original) > 6_000_000
    with smtplib.SMTP("127.0.0.1", gateway.ports["smarthost"], timeout=60) as c:
        c.ehlo("lab.test")
        refused = c.sendmail("bursar@college.example.org", ["a@remote.test"], original)
    assert refused == {}
    [t] = sink.wait_for(1, timeout=60)
    assert t.message.endswith(original)  # our fields in front; the client's bytes unchanged
    ours = t.message[: len(t.message) - len(original)]
    assert ours.startswith(b"DKIM-Signature: ") and b"\r\n\r\n" not in ours
    assert dkim.verify(t.message, dnsfunc=dns_from(records["records"]))


def test_user_without_grant_cannot_send_as_managed_address(gateway: Gateway) -> None:
    gateway.cli("domain", "add", "college.example.org")
    client = submission(gateway)
    code, text = client.docmd("MAIL", "FROM:<bursar@college.example.org>")
    assert (code, text[:5]) == (553, b"5.7.1")
    client.quit()


def test_smarthost_mail_is_delivered_through_relay(gateway: Gateway, sink: SmtpSink) -> None:
    with smtplib.SMTP("127.0.0.1", gateway.ports["smarthost"], timeout=10) as c:
        c.ehlo("lab.test")
        c.sendmail("cron@lab.test", ["a@remote.test", "b@remote.test"],
                   message(frm="cron@lab.test"))  # fmt: skip
    [t] = sink.wait_for(1, timeout=20)
    assert sorted(t.rcpt_to) == ["a@remote.test", "b@remote.test"]
    wait = gateway.cli("queue", "list", "--json")
    assert json.loads(wait.stdout) == [] or all(
        e["state"] != "held" for e in json.loads(wait.stdout)
    )

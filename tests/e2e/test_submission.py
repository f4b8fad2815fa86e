"""Submission (587 STARTTLS, 465 implicit TLS) and the smart host, against a live server."""

from __future__ import annotations

import smtplib
import socket
import ssl

import pytest

from mailgate.spool.entry import Envelope
from tests.e2e.conftest import ALICE, client_tls, message, submission, submissions
from tests.support.gateway import Gateway
from tests.support.waiting import wait_for


def raw_session(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.recv(1024)  # greeting
    return sock


def read_reply(sock: socket.socket | ssl.SSLSocket) -> bytes:
    """Read one complete (possibly multi-line) reply."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) >= 2 and len(lines[-2]) >= 4 and lines[-2][3:4] == b" ":
            return data


def envelope(gw: Gateway, qid: str) -> Envelope:
    return gw.envelope(qid)


def spooled(gw: Gateway, qid: str) -> bytes:
    return gw.message(qid)


def qid_of(reply: bytes | str) -> str:
    text = reply.decode() if isinstance(reply, bytes) else reply
    assert "queued as " in text, text
    return text.rsplit("queued as ", 1)[1].split()[0]


def send(client: smtplib.SMTP, frm: str, to: list[str], msg: bytes) -> str:
    client.mail(frm)
    for rcpt in to:
        code, text = client.rcpt(rcpt)
        assert code == 250, (code, text)
    code, text = client.data(msg)
    assert code == 250, (code, text)
    assert text.startswith(b"2.0.0 Ok: queued as "), text
    return qid_of(text)


def test_submission_offers_starttls_but_no_auth_before_tls(gateway: Gateway) -> None:
    client = smtplib.SMTP("127.0.0.1", gateway.ports["submission"], timeout=10)
    code, _ = client.ehlo("client.test")
    assert code == 250
    assert client.has_extn("starttls")
    assert not client.has_extn("auth")
    for ext in ("pipelining", "size", "8bitmime", "smtputf8", "enhancedstatuscodes"):
        assert client.has_extn(ext), ext
    assert client.docmd("AUTH", "PLAIN AGFsaWNlAHNlY3JldA==")[0] == 530
    code, text = client.docmd("MAIL", "FROM:<alice@example.org>")
    assert (code, text[:5]) == (530, b"5.7.0")
    client.quit()


def test_auth_offered_after_starttls_and_required_for_mail(gateway: Gateway) -> None:
    client = submission(gateway, login=None)
    assert "PLAIN" in client.esmtp_features["auth"] and "LOGIN" in client.esmtp_features["auth"]
    assert not client.has_extn("starttls")
    code, text = client.docmd("MAIL", "FROM:<alice@example.org>")
    assert (code, text) == (530, b"5.7.0 Authentication required")
    client.quit()


def test_bad_credentials_get_535_578(gateway: Gateway) -> None:
    client = submission(gateway, login=None)
    with pytest.raises(smtplib.SMTPAuthenticationError) as e:
        client.login("alice", "wrong password")
    assert e.value.smtp_code == 535
    error: object = e.value.smtp_error  # bytes at run time; typeshed says str
    assert isinstance(error, bytes) and error.startswith(b"5.7.8")
    with pytest.raises(smtplib.SMTPAuthenticationError) as e:
        client.login("nobody", "whatever")
    assert e.value.smtp_code == 535
    client.quit()


def test_submission_accepts_and_stamps(gateway: Gateway) -> None:
    client = submission(gateway)
    qid = send(client, "alice@example.org", ["someone@remote.test"], message())
    client.quit()
    data = spooled(gateway, qid)
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("Received: from client.test ([127.0.0.1])")
    assert f"by mail.example.org (mailgate submission port {gateway.ports['submission']})" in head
    assert f"with ESMTPSA id {qid}" in head
    assert "(PLAIN:alice)" in head
    assert "(TLSv1.3:" in head or "(TLSv1.2:" in head
    assert "for <someone@remote.test>;" in head
    assert "\r\nMessage-ID: <" in head and "\r\nDate: " in head  # RFC 6409 §8 fix-ups
    assert "\r\nSender:" not in head  # alice sent as herself
    assert data.endswith(b"\r\n\r\nHello there.\r\n")
    env = envelope(gateway, qid)
    assert env.mail_from == "alice@example.org"
    assert env.login == "alice"
    assert [r.address for r in env.recipients] == ["someone@remote.test"]


def test_submissions_implicit_tls_auth_login(gateway: Gateway) -> None:
    client = submissions(gateway, login=None)
    client.user, client.password = ALICE
    code, text = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
    assert code == 235, text
    qid = send(client, "alice@example.org", ["x@remote.test"], message(to="x@remote.test"))
    client.quit()
    head = spooled(gateway, qid).split(b"\r\n\r\n", 1)[0].decode()
    assert f"(mailgate submissions port {gateway.ports['submissions']})" in head
    assert "with ESMTPSA" in head and "(LOGIN:alice)" in head


def test_foreign_from_gets_sender_and_envelope_rewritten(gateway: Gateway) -> None:
    client = submission(gateway)
    # A client Sender: naming a foreign address is replaced by ours; one naming an institution
    # address the user may not use is refused (tests/e2e/test_identity.py, issue #11).
    msg = message(frm="Alice <alice.private@gmail.test>", extra="Sender: spoof@gmail.test\r\n")
    qid = send(client, "alice.private@gmail.test", ["x@remote.test"], msg)
    client.quit()
    head = spooled(gateway, qid).split(b"\r\n\r\n", 1)[0].decode()
    assert head.count("\r\nSender: ") == 1
    assert "\r\nSender: <alice@example.org>\r\n" in head + "\r\n"
    assert "spoof@gmail.test" not in head
    assert envelope(gateway, qid).mail_from == "alice@example.org"


def test_null_sender_left_alone(gateway: Gateway) -> None:
    client = submission(gateway)
    qid = send(client, "", ["x@remote.test"], message())
    client.quit()
    assert envelope(gateway, qid).mail_from == ""


def test_managed_domain_address_not_granted_gets_553(gateway: Gateway) -> None:
    client = submission(gateway)
    code, text = client.docmd("MAIL", "FROM:<bob@example.org>")
    assert (code, text[:5]) == (553, b"5.7.1")
    client.rset()
    client.mail("alice@example.org")
    client.rcpt("x@remote.test")
    code, text = client.data(message(frm="bob@example.org"))
    assert (code, text[:5]) == (553, b"5.7.1")
    client.quit()
    assert gateway.queued() == []


def test_smarthost_relays_for_internal_network(gateway: Gateway) -> None:
    client = smtplib.SMTP("127.0.0.1", gateway.ports["smarthost"], timeout=10)
    client.ehlo("labhost.test")
    assert not client.has_extn("auth")
    qid = send(client, "cron@labhost.test", ["ops@remote.test"], message(frm="cron@labhost.test"))
    client.quit()
    head = spooled(gateway, qid).split(b"\r\n\r\n", 1)[0].decode()
    assert "with ESMTP id" in head and "(mailgate smarthost port" in head
    assert "Message-ID" not in head  # fix-ups are for submission only


def test_smarthost_refuses_relay_from_outside_networks(tmp_path: object) -> None:
    from pathlib import Path

    gw = Gateway(Path(str(tmp_path)) / "gw", {"smarthost": {"networks": ["127.0.0.1/32"]}})
    gw.start("--no-delivery")
    try:
        sock = socket.create_connection(
            ("127.0.0.1", gw.ports["smarthost"]), timeout=10, source_address=("127.0.0.9", 0)
        )
        client = smtplib.SMTP(timeout=10)
        client.sock = sock
        client.file = None
        assert client.getreply()[0] == 220
        client.ehlo("outsider.test")
        client.mail("x@outsider.test")
        code, text = client.rcpt("victim@remote.test")
        assert (code, text) == (550, b"5.7.1 Relaying denied")
        client.quit()
    finally:
        gw.stop()


def test_oversize_message_gets_552_534(tmp_path: object) -> None:
    from pathlib import Path

    gw = Gateway(Path(str(tmp_path)) / "gw", {"limits": {"max_message_size": 10000}})
    gw.start("--no-delivery")
    try:
        client = smtplib.SMTP("127.0.0.1", gw.ports["smarthost"], timeout=10)
        client.ehlo("labhost.test")
        assert client.esmtp_features["size"] == "10000"
        code, text = client.docmd("MAIL", "FROM:<a@labhost.test> SIZE=20000")
        assert (code, text[:5]) == (552, b"5.3.4")
        client.mail("a@labhost.test")
        client.rcpt("b@remote.test")
        code, text = client.data(message(body="x" * 80 + "\r\n") * 200)
        assert (code, text[:5]) == (552, b"5.3.4")
        # the session goes on: a small message is still accepted
        client.mail("a@labhost.test")
        client.rcpt("b@remote.test")
        assert client.data(message())[0] == 250
        client.quit()
        assert len(gw.queued()) == 1
    finally:
        gw.stop()


def test_too_many_recipients_gets_452_453(tmp_path: object) -> None:
    from pathlib import Path

    gw = Gateway(Path(str(tmp_path)) / "gw", {"limits": {"max_recipients": 3}})
    gw.start("--no-delivery")
    try:
        client = smtplib.SMTP("127.0.0.1", gw.ports["smarthost"], timeout=10)
        client.ehlo("labhost.test")
        client.mail("a@labhost.test")
        for i in range(3):
            assert client.rcpt(f"r{i}@remote.test")[0] == 250
        code, text = client.rcpt("r4@remote.test")
        assert (code, text[:5]) == (452, b"4.5.3")
        assert client.data(message())[0] == 250
        client.quit()
    finally:
        gw.stop()


def test_starttls_injection_never_reaches_tls_session(gateway: Gateway) -> None:
    sock = raw_session(gateway.ports["submission"])
    sock.sendall(b"EHLO client.test\r\n")
    read_reply(sock)
    sock.sendall(b"STARTTLS\r\nRSET\r\n")
    reply = read_reply(sock)
    # Either the server refuses outright, or it offers TLS and the injected RSET is never answered.
    if reply.startswith(b"220"):
        tls = client_tls().wrap_socket(sock, server_hostname="mail.example.org")
        tls.sendall(b"NOOP\r\n")
        assert read_reply(tls).startswith(b"250"), "the injected RSET must not be answered"
    else:
        assert reply.startswith(b"554 5.5.1"), reply
        assert sock.recv(100) == b""


def test_bare_lf_in_data_is_refused_and_not_spooled(gateway: Gateway) -> None:
    sock = raw_session(gateway.ports["smarthost"])
    for line in (b"EHLO lab.test", b"MAIL FROM:<a@lab.test>", b"RCPT TO:<b@remote.test>", b"DATA"):
        sock.sendall(line + b"\r\n")
        assert read_reply(sock)[:1] in (b"2", b"3")
    sock.sendall(b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<evil@lab.test>\r\n.\r\n")
    reply = read_reply(sock)
    assert reply.startswith(b"554 5.5.2"), reply
    wait_for(lambda: sock.recv(100) == b"", timeout=5)
    assert gateway.queued() == []


def test_idle_client_times_out(tmp_path: object) -> None:
    from pathlib import Path

    gw = Gateway(Path(str(tmp_path)) / "gw", {"limits": {"command_timeout": 1}})
    gw.start("--no-delivery")
    try:
        sock = raw_session(gw.ports["smarthost"])
        sock.settimeout(10)
        assert read_reply(sock).startswith(b"421 4.4.2")
        assert sock.recv(100) == b""
    finally:
        gw.stop()


def test_swaks_starttls_auth(gateway: Gateway) -> None:
    import subprocess

    proc = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(gateway.ports["submission"]),
         "--tls", "--auth", "PLAIN", "--auth-user", ALICE[0], "--auth-password", ALICE[1],
         "--from", "alice@example.org", "--to", "swaks@remote.test", "--helo", "swaks.test"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "<~  250 2.0.0 Ok: queued as " in proc.stdout
    qid = proc.stdout.split("queued as ", 1)[1].split()[0]
    assert b"(PLAIN:alice)" in spooled(gateway, qid)


def test_msmtp_implicit_tls(gateway: Gateway, tmp_path: object) -> None:
    import subprocess
    from pathlib import Path

    rc = Path(str(tmp_path)) / "msmtprc"
    rc.write_text(
        "account default\nhost 127.0.0.1\n"
        f"port {gateway.ports['submissions']}\ntls on\ntls_starttls off\ntls_certcheck off\n"
        f"auth plain\nuser {ALICE[0]}\npassword {ALICE[1]}\nfrom alice@example.org\n"
    )
    rc.chmod(0o600)
    proc = subprocess.run(
        ["msmtp", "-C", str(rc), "msmtp@remote.test"],
        input=message(to="msmtp@remote.test").decode(), capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    [qid] = gateway.queued()
    env = gateway.envelope(qid)
    assert [r.address for r in env.recipients] == ["msmtp@remote.test"]
    assert env.service == "submissions"

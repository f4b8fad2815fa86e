"""Shared helpers for the [auth] backend tests: AUTH through a real `mailgate serve`."""

from __future__ import annotations

import base64
import json
import smtplib
import subprocess
from pathlib import Path

from mailgate.directory import passwords
from tests.e2e.conftest import client_tls
from tests.support.gateway import Gateway

# The AUTH defence's delays would slow every failure test down; the defence itself is tested
# with its own thresholds (test_*_auth_defence).
QUIET_GUARD = {"auth_delay_after": 1000, "auth_refuse_after": 1000,
               "auth_login_refuse_after": 1000}  # fmt: skip


def connect(gw: Gateway) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", gw.ports["submission"], timeout=30)
    client.ehlo("client.test")
    client.starttls(context=client_tls())
    client.ehlo("client.test")
    return client


def auth_plain(client: smtplib.SMTP, login: str, password: str) -> tuple[int, bytes]:
    """AUTH PLAIN with an initial response (RFC 4954 §4): the reply code and text."""
    token = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
    return client.docmd("AUTH", f"PLAIN {token}")


def try_login(gw: Gateway, login: str, password: str) -> tuple[int, bytes]:
    client = connect(gw)
    try:
        return auth_plain(client, login, password)
    finally:
        client.close()


def head_of(gw: Gateway, qid: str) -> str:
    return gw.message(qid).split(b"\r\n\r\n", 1)[0].decode()


def swaks(gw: Gateway, login: str, password: str, frm: str, *,
          auth: str = "PLAIN") -> subprocess.CompletedProcess[str]:  # fmt: skip
    """swaks over STARTTLS on the submission port."""
    return subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(gw.ports["submission"]), "--tls",
         "--auth", auth, "--auth-user", login, "--auth-password", password, "--from", frm,
         "--to", "swaks@remote.test", "--helo", "swaks.test", "--header", f"From: {frm}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def swaks_qid(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "<~  235 2.7.0 Authentication successful" in proc.stdout
    return proc.stdout.split("<~  250 2.0.0 Ok: queued as ", 1)[1].split()[0]


def msmtp(gw: Gateway, folder: Path, login: str, password: str, frm: str, *, auth: str = "plain",
          debug: bool = False) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """msmtp with implicit TLS on the submissions port; `password` may be a bearer token.
    `debug`: the SMTP dialogue on stdout ("--> " the client's lines, "<-- " the server's)."""
    folder.mkdir(parents=True, exist_ok=True)
    rc, secret = folder / "msmtprc", folder / "secret"
    secret.write_text(password)  # passwordeval: a token is longer than an msmtprc line may be
    rc.write_text(
        f"account default\nhost 127.0.0.1\nport {gw.ports['submissions']}\ntls on\n"
        f"tls_starttls off\ntls_certcheck off\nauth {auth}\nuser {login}\n"
        f"passwordeval cat '{secret}'\nfrom {frm}\n"
    )
    rc.chmod(0o600)
    text = f"From: {frm}\r\nTo: msmtp@remote.test\r\nSubject: hello\r\n\r\nHello.\r\n"
    options = ["--debug"] if debug else []
    return subprocess.run(["msmtp", *options, "-C", str(rc), "msmtp@remote.test"], input=text,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


def app_password_lifecycle(gw: Gateway, login: str, frm: str) -> None:
    """`mailgate app-password add|list|remove` against a running gateway, whatever its
    backend: the password is printed once and works at once; the log names it, Received:
    names only the login; list shows it without the secret and with its last use; remove
    refuses it at once (the credential cache follows the directory)."""
    name = f"mail-client-of-{login}"
    secret = gw.cli("app-password", "add", login, name).stdout.strip()
    assert passwords.is_app_password_shaped(secret), secret
    client = connect(gw)
    assert auth_plain(client, login, secret) == (235, b"2.7.0 Authentication successful")
    client.mail(frm)
    client.rcpt("someone@remote.test")
    code, text = client.data(f"From: {frm}\r\nSubject: app\r\n\r\nHi.\r\n".encode())
    client.quit()
    assert code == 250, text
    head = head_of(gw, text.decode().rsplit(" ", 1)[1])
    assert f"(PLAIN:{login})" in head and name not in head
    assert f"auth ok mech=PLAIN login={login} app_password={name}" in gw.log_text()
    listed = json.loads(gw.cli("app-password", "list", login, "--json").stdout)
    assert [(a["login"], a["name"]) for a in listed] == [(login, name)]
    assert listed[0]["created"] and listed[0]["last_used"]
    assert secret not in gw.cli("app-password", "list").stdout
    gw.cli("app-password", "remove", login, name)
    assert try_login(gw, login, secret) == (535, b"5.7.8 Authentication credentials invalid")

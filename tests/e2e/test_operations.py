"""Operating a running `mailgate serve` (issue #16): /metrics, /healthz, /readyz, trace, status,
reload (SIGHUP) and graceful stop (SIGTERM), with real traffic through real clients.
"""

from __future__ import annotations

import base64
import json
import signal
import smtplib
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailgate import config, tlscert
from mailgate.cli.common import open_directory
from mailgate.tracelog.query import find
from tests.e2e.conftest import ALICE, client_tls, message, submission, submissions
from tests.support.gateway import Gateway
from tests.support.ports import free_port
from tests.support.smtpsink import SmtpSink
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink(host="127.0.0.1", port=0) as s:
        yield s


def make_gateway(root: Path, sink: SmtpSink, **sections: dict[str, Any]) -> Gateway:
    admin = free_port()
    settings: dict[str, dict[str, Any]] = {
        "delivery": {"relay": f"127.0.0.1:{sink.port}", "retry_schedule": [1]},
        "server": {"workers": 2},
        "admin": {"listen": [f"127.0.0.1:{admin}"]},
    }
    for name, values in sections.items():
        settings.setdefault(name, {}).update(values)
    gw = Gateway(root, settings)
    gw.add_user(*ALICE, address="alice@example.org")
    return gw


@pytest.fixture
def gateway(tmp_path: Path, sink: SmtpSink) -> Iterator[Gateway]:
    gw = make_gateway(tmp_path / "gw", sink)
    gw.start()
    try:
        yield gw
    finally:
        gw.finish()


def admin_url(gw: Gateway, path: str) -> str:
    return f"http://{gw.settings['admin']['listen'][0]}{path}"


def http_get(gw: Gateway, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(admin_url(gw, path), timeout=10) as r:  # noqa: S310
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()


def samples(gw: Gateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    status, text = http_get(gw, "/metrics")
    assert status == 200
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(snapshot: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:  # fmt: skip
    return snapshot.get((name, tuple(sorted(labels.items()))), 0.0)


def send_submission(gw: Gateway, rcpts: list[str], *, msgid: str = "") -> str:
    """One message from alice on 587; returns its queue id."""
    extra = f"Message-ID: <{msgid}>\r\n" if msgid else ""
    with submission(gw) as c:
        c.mail("alice@example.org")
        for r in rcpts:
            assert c.rcpt(r)[0] == 250
        code, text = c.data(message(to=rcpts[0], extra=extra))
    assert code == 250, text
    return text.decode().rsplit(" ", 1)[-1]


def send_smarthost(gw: Gateway, rcpt: str = "ops@remote.test") -> str:
    with smtplib.SMTP("127.0.0.1", gw.ports["smarthost"], timeout=10) as c:
        c.ehlo("lab.test")
        c.mail("cron@lab.test")
        assert c.rcpt(rcpt)[0] == 250
        code, text = c.data(message(frm="cron@lab.test", to=rcpt))
    assert code == 250, text
    return text.decode().rsplit(" ", 1)[-1]


def trace(gw: Gateway, query: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = json.loads(gw.cli("trace", "--json", query, check=False).stdout)
    return result


def kinds(t: dict[str, Any]) -> list[str]:
    return [e["kind"] for e in t["events"]]


# --- /metrics, /healthz, /readyz ---------------------------------------------------------------


def test_counters_move_by_exactly_the_messages_sent(gateway: Gateway, sink: SmtpSink) -> None:
    before = samples(gateway)
    for _ in range(3):
        send_submission(gateway, ["someone@remote.test"])
    for _ in range(2):
        send_smarthost(gateway)
    with submission(gateway) as c:  # a sender alice may not use: 553 5.7.1
        assert c.mail("bob@example.org")[0] == 553
    with submissions(gateway, login=None) as c:  # one AUTH attempt (login() tries each mech)
        plain = base64.b64encode(b"\0alice\0wrong password").decode()
        assert c.docmd("AUTH", f"PLAIN {plain}")[0] == 535
    sink.wait_for(5, timeout=30)

    def counted() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        snapshot = samples(gateway)
        done = value(snapshot, "mailgate_deliveries_total", status="delivered") >= 5
        return snapshot if done else None

    # The engine counts after the remote 250: wait for the fifth outcome, then compare all.
    after = wait_for(counted, timeout=20, what="five deliveries counted")

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("mailgate_messages_accepted_total", service="submission") == 3
    assert moved("mailgate_messages_accepted_total", service="smarthost") == 2
    assert moved("mailgate_messages_accepted_total", service="submissions") == 0
    assert moved("mailgate_messages_refused_total", service="submission", code="553") == 1
    assert moved("mailgate_deliveries_total", status="delivered") == 5
    assert moved("mailgate_deliveries_total", status="bounced") == 0
    assert moved("mailgate_auth_failures_total", service="submissions") == 1
    assert moved("mailgate_delivery_tls_total", tls="no", verified="no") == 5
    assert moved("mailgate_scan_verdicts_total", verdict="clean") == 5
    assert moved("mailgate_delivery_delay_seconds_count", status="delivered") == 5
    assert moved("mailgate_accept_duration_seconds_count", service="submission") == 3
    # Two workers took the connections; the sums are over both (and the supervisor).
    assert value(after, "mailgate_queue_messages", state="active") == 0
    assert ("mailgate_queue_oldest_message_age_seconds", ()) in after


def test_health_and_readiness(gateway: Gateway) -> None:
    assert http_get(gateway, "/healthz") == (200, "ok\n")
    assert http_get(gateway, "/readyz") == (200, "ready\n")


def test_not_ready_names_the_scanner(tmp_path: Path, sink: SmtpSink) -> None:
    closed = free_port()  # nothing listens: clamd is unreachable
    gw = make_gateway(tmp_path / "gw", sink, scanner={"clamd": f"tcp:127.0.0.1:{closed}"})
    gw.start()
    try:
        status, text = http_get(gw, "/readyz")
        assert status == 503
        assert text.startswith("not ready\nscanner: ")
        assert str(closed) in text
        assert http_get(gw, "/healthz")[0] == 200
    finally:
        gw.finish()


# --- trace and status --------------------------------------------------------------------------


@pytest.mark.timeout(300)  # two starts of the server on a machine that may be busy
def test_trace_after_delivery_bounce_and_restart(gateway: Gateway, sink: SmtpSink) -> None:
    sink.behaviour.rcpt_for["nobody@remote.test"] = "550 5.1.1 No such user"
    qid = send_submission(gateway, ["friend@remote.test", "nobody@remote.test"],
                          msgid="trace-1@client.test")  # fmt: skip
    _, bounce = sink.wait_for(2, timeout=30)
    assert bounce.mail_from == "" and bounce.rcpt_to == ("alice@example.org",)
    wait_for(lambda: qid not in gateway.queued() and not gateway.queued(), timeout=20,
             what="spool empty")  # fmt: skip

    def check() -> None:
        # Every key through the query `mailgate trace` runs (in this process: each command
        # is a new interpreter, seconds on a busy machine), then the command itself once.
        for query in (qid, "<trace-1@client.test>", "TRACE-1@client.test", "alice",
                      "friend@remote.test", "nobody@remote.test"):  # fmt: skip
            assert [t.qid for t in find(folder, query)].count(qid) == 1, query
        by_sender = {t.qid for t in find(folder, "alice@example.org")}
        found = trace(gateway, qid)
        [t] = [t for t in found if t["qid"] == qid]
        assert t["status"] == "partly bounced"
        assert kinds(t)[0] == "accepted" and kinds(t)[-1] == "removed"
        assert {"delivered", "bounced", "dsn"} <= set(kinds(t))
        accepted = t["events"][0]
        assert accepted["login"] == "alice" and accepted["service"] == "submission"
        assert accepted["client"] == "127.0.0.1"
        assert accepted["message_id"] == "<trace-1@client.test>"
        [bounced] = [e for e in t["events"] if e["kind"] == "bounced"]
        assert bounced["to"] == "nobody@remote.test"
        assert bounced["reply"].startswith("550 5.1.1")
        assert bounced["relay"].startswith("127.0.0.1")
        [dsn] = [e for e in t["events"] if e["kind"] == "dsn"]
        # The bounce itself: found by the original's queue id, delivered to alice.
        [report] = [t for t in found if t["qid"] == dsn["dsn_qid"]]
        assert report["status"] == "delivered"
        assert kinds(report) == ["queued", "delivered", "removed"]
        assert {qid, dsn["dsn_qid"]} <= by_sender

    folder = gateway.root / "trace"

    def written() -> bool:
        traces = find(folder, qid)
        return len(traces) == 2 and all(t.events[-1]["kind"] == "removed" for t in traces)

    wait_for(written, timeout=20, what="events written")
    check()
    text = gateway.cli("trace", qid).stdout
    assert text.startswith(f"qid={qid} status=partly bounced from=<alice@example.org>")
    gateway.stop()
    check()  # the server is down: the log is on disk
    gateway.start()
    check()
    assert gateway.cli("trace", "nobody-at-all@nowhere.test", check=False).returncode == 1


def test_trace_shows_a_refused_message(gateway: Gateway) -> None:
    body = message(extra="", body="see attachment\r\n").replace(
        b"see attachment\r\n",
        b"--b\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="run.exe"\r\n\r\nMZ\r\n--b--\r\n',
    )
    body = body.replace(b"\r\n\r\n", b"\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed;"
                        b' boundary="b"\r\n\r\n', 1)  # fmt: skip
    with submission(gateway) as c:
        c.mail("alice@example.org")
        c.rcpt("someone@remote.test")
        code, text = c.data(body)
    assert code == 554, text
    found = wait_for(lambda: trace(gateway, "someone@remote.test"), timeout=10, what="trace")
    [t] = found
    assert t["status"] == "rejected"
    assert t["events"][0]["reply"].startswith("554 5.7.1")


def test_status_counts_the_last_hour(gateway: Gateway, sink: SmtpSink) -> None:
    sink.behaviour.rcpt_for["nobody@remote.test"] = "550 5.1.1 No such user"
    for _ in range(2):
        send_submission(gateway, ["someone@remote.test"])
    send_smarthost(gateway, "nobody@remote.test")
    with submission(gateway) as c:
        assert c.mail("bob@example.org")[0] == 553
    sink.wait_for(2, timeout=30)
    # What the compromised-account breaker does to a login (limits/breaker.py).
    open_directory(config.load(gateway.config, check_files=False)).set_suspended("alice", True)
    wait_for(lambda: not gateway.queued(), timeout=30, what="spool empty")

    def status() -> dict[str, Any]:
        result: dict[str, Any] = json.loads(gateway.cli("status", "--json").stdout)
        return result

    def bounce_counted() -> dict[str, Any] | None:
        s = status()
        return s if s["last_hour"]["bounced"] == 1 else None

    out = wait_for(bounce_counted, timeout=10, what="the bounce counted")
    # delivered: the two messages and the bounce (DSN) that reported the third one.
    assert out["last_hour"] == {"accepted": 3, "refused": 1, "delivered": 3, "deferred": 0,
                                "bounced": 1}  # fmt: skip
    assert out["queue"] == {"active": 0, "deferred": 0, "held": 0}
    assert out["top_logins"] == [{"login": "alice", "messages": 2, "recipients": 2}]
    assert out["top_networks"] == [{"network": "127.0.0.0/24", "messages": 3, "recipients": 3}]
    assert out["suspended"] == ["alice"]
    text = gateway.cli("status").stdout
    assert "accepted=3" in text and "alice" in text and "127.0.0.0/24" in text


# --- reload ------------------------------------------------------------------------------------


def peer_certificate(port: int, *, starttls: bool) -> bytes:
    if starttls:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
            c.starttls(context=client_tls())
            sock = c.sock
            assert isinstance(sock, ssl.SSLSocket)
            der = sock.getpeercert(binary_form=True)
    else:
        with smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=client_tls()) as c:
            sock = c.sock
            assert isinstance(sock, ssl.SSLSocket)
            der = sock.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_reload_presents_a_new_certificate_to_new_connections(
    gateway: Gateway, sink: SmtpSink
) -> None:
    old = peer_certificate(gateway.ports["submissions"], starttls=False)
    assert peer_certificate(gateway.ports["submission"], starttls=True) == old
    # A session in the middle of its transaction while the certificate changes.
    open_session = submission(gateway)
    open_session.mail("alice@example.org")
    assert open_session.rcpt("during-reload@remote.test")[0] == 250
    cert, key = gateway.root / "tls" / "renewed.pem", gateway.root / "tls" / "renewed.key"
    tlscert.write_self_signed(cert, key, "mail.example.org")
    gateway.settings["tls"].update(cert=str(cert), key=str(key))
    gateway.write_config()
    result = gateway.cli("reload")
    assert result.stdout.startswith("reloaded: mailgate serve pid ")
    new = peer_certificate(gateway.ports["submissions"], starttls=False)
    assert new != old
    assert peer_certificate(gateway.ports["submission"], starttls=True) == new
    code, _ = open_session.data(message(to="during-reload@remote.test"))
    assert code == 250
    open_session.quit()
    [t] = sink.wait_for(1, timeout=30)
    assert t.rcpt_to == ("during-reload@remote.test",)


def test_reload_refuses_a_broken_configuration(gateway: Gateway, sink: SmtpSink) -> None:
    good = gateway.config.read_text()
    gateway.settings.setdefault("limits", {})["max_message_size"] = -1
    gateway.write_config()
    result = gateway.cli("reload", check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("mailgate: limits.max_message_size: expected a positive")
    # The same file sent straight to the server (kill -HUP): refused there, logged.
    assert gateway.proc is not None
    gateway.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused: limits.max_message_size" in gateway.log_text(), timeout=10)
    # The old configuration is in force: mail flows.
    send_submission(gateway, ["after-refusal@remote.test"])
    sink.wait_for(1, timeout=30)
    gateway.config.write_text(good)


# --- graceful stop -----------------------------------------------------------------------------


class Lines:
    """One reply line at a time from a raw socket (replies may arrive in one segment)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")

    def reply(self) -> str:
        return self.file.readline().decode()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


def stop_and_wait(gw: Gateway) -> int:
    """SIGTERM; the exit status, which must come within 30 s (else the test fails here)."""
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGTERM)
    try:
        return gw.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("mailgate serve did not exit within 30 s of SIGTERM")


def test_sigterm_gives_an_idle_session_421(gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gateway.ports["smarthost"]), timeout=20) as s:
        c = Lines(s)
        assert c.reply().startswith("220 ")
        c.send(b"HELO lab.test\r\n")
        assert c.reply().startswith("250 ")
        assert stop_and_wait(gateway) == 0
        assert c.reply() == "421 4.3.2 Service shutting down, closing connection\r\n"
        assert c.reply() == ""  # closed
    gateway.proc = None


def test_sigterm_answers_a_data_in_progress_then_421(tmp_path: Path, sink: SmtpSink) -> None:
    gw = make_gateway(tmp_path / "gw", sink)
    gw.start("--no-delivery")
    try:
        s = socket.create_connection(("127.0.0.1", gw.ports["smarthost"]), timeout=20)
        c = Lines(s)
        assert c.reply().startswith("220 ")
        c.send(b"HELO lab.test\r\n")
        assert c.reply().startswith("250 ")
        for line, code in ((b"MAIL FROM:<cron@lab.test>", "250"),
                           (b"RCPT TO:<late@remote.test>", "250"), (b"DATA", "354")):  # fmt: skip
            c.send(line + b"\r\n")
            assert c.reply().startswith(code)
        c.send(b"Subject: half\r\n\r\nfirst half\r\n")
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "sessions told to finish" in gw.log_text(), timeout=10)
        c.send(b"second half\r\n.\r\n")
        reply = c.reply()
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        qid = reply.split()[-1]
        assert c.reply() == "421 4.3.2 Service shutting down, closing connection\r\n"
        assert c.reply() == ""  # closed
        c.file.close()
        s.close()
        assert gw.proc.wait(timeout=30) == 0
        gw.proc = None
        assert gw.queued() == [qid]
        gw.start()  # with delivery: the answered message goes out
        [t] = sink.wait_for(1, timeout=30)
        assert t.message.endswith(b"first half\r\nsecond half\r\n")
    finally:
        gw.finish()


def test_sigterm_with_a_delivery_in_flight(tmp_path: Path, sink: SmtpSink) -> None:
    sink.behaviour.hold_end_of_data = True  # the remote never answers the final dot
    gw = make_gateway(tmp_path / "gw", sink)
    gw.start()
    try:
        qid = send_smarthost(gw)
        wait_for(lambda: sink.commands.count("DATA") == 1 and sink.commands, timeout=20,
                 what="the delivery is in flight")  # fmt: skip
        assert stop_and_wait(gw) == 0
        gw.proc = None
        # Never acknowledged by the remote: still ours, and sent again after the restart.
        assert gw.queued() == [qid]
        sink.behaviour.hold_end_of_data = False
        gw.start()
        [t] = wait_for(lambda: [x for x in sink.accepted() if x.is_accepted], timeout=30)
        assert t.rcpt_to == ("ops@remote.test",)
        wait_for(lambda: not gw.queued(), timeout=20, what="spool empty")
        assert len([x for x in sink.accepted() if x.is_accepted]) == 1
    finally:
        gw.finish()


# --- [log] format = "json" ---------------------------------------------------------------------


def test_json_logs_parse_line_by_line(tmp_path: Path, sink: SmtpSink) -> None:
    gw = make_gateway(tmp_path / "gw", sink, log={"format": "json"})
    gw.start()
    try:
        qid = send_submission(gw, ["json@remote.test"])
        sink.wait_for(1, timeout=30)
        wait_for(lambda: f'"qid":"{qid}","to":"<json@remote.test>"' in gw.log_text(), timeout=20)
    finally:
        gw.stop()
    lines = gw.log_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "pid", "logger", "message"} <= r.keys() for r in records)
    [accepted] = [r for r in records if r.get("qid") == qid and "accepted" in r["message"]]
    assert accepted["login"] == "alice" and accepted["service"] == "submission"
    [sent] = [r for r in records if r.get("qid") == qid and r.get("status") == "sent"]
    assert sent["to"] == "<json@remote.test>" and sent["reply"].startswith("250")

"""The operator pages on the admin application: Basic auth, escaping, the chart, the trace."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailgate import tracelog
from mailgate.admin.app import AdminContext, make_app
from mailgate.config import TraceConfig
from mailgate.status import Overview, QueuedMessage, QueueFigures
from mailgate.tracelog.query import Summary
from mailgate.web.common import CSP
from mailgate.web.operator import OperatorContext, add_operator_pages, is_authorised
from tests.web.conftest import run, served

HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>"


def overview() -> Overview:
    now = datetime.now(UTC)
    message = QueuedMessage(
        qid="AB12CD34EF", state="deferred", received_at=now - timedelta(hours=3),
        mail_from="alice@example.org", recipients=("bob@example.net",), login="alice",
        client="192.0.2.7", size=1234, attempts=4, last_reply="451 4.7.1 try later",
        subject=HOSTILE,
    )  # fmt: skip
    held = QueuedMessage(
        qid="HELD000001", state="held", received_at=now - timedelta(days=2),
        mail_from=f"{HOSTILE}@example.org", recipients=("x@example.net",), login="mallory",
        client="192.0.2.9", size=10, attempts=0, last_reply="", subject="held one",
    )  # fmt: skip
    return Overview(
        now=now,
        queue=QueueFigures(
            {"active": 0, "deferred": 1, "held": 1},
            172800,
            {"active": [], "deferred": [message], "held": [held]},
        ),
        last_hour=Summary(
            since=0,
            counts={"accepted": 5, "refused": 2, "delivered": 4, "deferred": 1, "bounced": 0},
            top_logins=[(f"{HOSTILE}login", 5, 9)],
            top_networks=[("192.0.2.0/24", 5, 9)],
        ),
        by_hour=[
            {"accepted": i, "refused": i % 3, "delivered": i, "deferred": 0, "bounced": 0}
            for i in range(24)
        ],
        by_hour_start=(now.timestamp() // 3600 - 23) * 3600,
        suspended=[f"{HOSTILE}suspended"],
    )


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_basic_auth_guards_the_operator_pages_only(tmp_path: Path) -> None:
    secret = tmp_path / "admin-password"
    secret.write_text("correct horse\n")

    async def go() -> None:
        application = make_app(AdminContext())
        add_operator_pages(application, OperatorContext(
            "mail.example.org", overview, tmp_path / "trace", secret))  # fmt: skip
        async with served(application) as c:
            for path in ("/", "/trace?q=alice"):
                r = await c.get(path)
                assert r.status == 401
                assert r.headers["WWW-Authenticate"].startswith('Basic realm="mailgate operators"')
                r = await c.get(path, headers=basic("admin", "wrong horse"))
                assert r.status == 401
                r = await c.get(path, headers=basic("root", "correct horse"))
                assert r.status == 401
                r = await c.get(path, headers={"Authorization": "Basic !!notbase64"})
                assert r.status == 401
            r = await c.get("/", headers=basic("admin", "correct horse"))
            assert r.status == 200
            assert r.headers["Content-Security-Policy"] == CSP
            assert r.headers["Cache-Control"] == "no-store"
            for path in ("/healthz", "/readyz", "/metrics"):  # INTERFACE: these stay open
                assert (await c.get(path)).status == 200
            secret.write_text("new horse\n")  # read at each request
            assert (await c.get("/", headers=basic("admin", "correct horse"))).status == 401
            assert (await c.get("/", headers=basic("admin", "new horse"))).status == 200
            secret.unlink()  # fail closed
            assert (await c.get("/", headers=basic("admin", "new horse"))).status == 503

    run(go)


def test_no_password_file_leaves_the_pages_open(tmp_path: Path) -> None:
    async def go() -> None:
        application = make_app(AdminContext())
        add_operator_pages(application, OperatorContext(
            "mail.example.org", overview, tmp_path / "trace", None))  # fmt: skip
        async with served(application) as c:
            assert (await c.get("/")).status == 200

    run(go)


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        ("Basic " + base64.b64encode(b"admin:pw").decode(), True),
        ("basic " + base64.b64encode(b"admin:pw").decode(), True),
        ("Basic " + base64.b64encode(b"admin:pw2").decode(), False),
        ("Basic " + base64.b64encode(b"admin").decode(), False),
        ("Bearer xyz", False),
        ("", False),
    ],
)
def test_is_authorised(header: str, ok: bool) -> None:
    assert is_authorised(header, "pw") is ok
    assert is_authorised(header, "") is False  # an empty password file opens nothing


def test_overview_escapes_everything_from_mail_and_users(tmp_path: Path) -> None:
    async def go() -> None:
        application = make_app(AdminContext())
        add_operator_pages(application, OperatorContext(
            "mail.example.org", overview, tmp_path / "trace", None))  # fmt: skip
        async with served(application) as c:
            text = await (await c.get("/")).text()
        assert "<script>" not in text and "<img" not in text
        escaped = "&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;"
        assert text.count(escaped) >= 4  # subject, sender, top login, suspended
        assert '<svg id="traffic-chart"' in text
        assert text.count("<rect x=") == 24 * 3
        assert 'href="/trace?q=AB12CD34EF"' in text
        assert 'href="/trace?q=%3Cscript%3E' in text  # a login in a link is URL-encoded

    run(go)


def test_trace_page_reads_the_event_log(tmp_path: Path) -> None:
    tracelog.start(TraceConfig(path=tmp_path / "trace"))
    try:
        tracelog.accepted("Q1TRACE001", mail_from="alice@example.org", rcpts=["bob@example.net"],
                          size=10, login="alice", service="submission", client="192.0.2.7",
                          sid="S1", message_id=f"<{HOSTILE}@x>")  # fmt: skip
    finally:
        tracelog.stop()

    async def go() -> None:
        application = make_app(AdminContext())
        add_operator_pages(application, OperatorContext(
            "mail.example.org", overview, tmp_path / "trace", None))  # fmt: skip
        async with served(application) as c:
            r = await c.get("/trace", params={"q": "Q1TRACE001"})
            assert r.status == 200
            text = await r.text()
            assert "Q1TRACE001" in text and "accepted" in text and "<script>" not in text
            r = await c.get("/trace", params={"q": HOSTILE})
            assert r.status == 404 and "<script>" not in await r.text()

    run(go)

"""The pages in a real browser: `mailgate serve` with [web] (HTTPS) and [admin] (Basic auth),
Debian's headless chromium driven over the DevTools protocol, assertions on the rendered DOM,
and screenshots at desktop and phone width.

Screenshots go to $MAILGATE_SCREENSHOTS, else tests/output/screenshots (git-ignored):
settings-desktop.png, settings-phone.png, operator-desktop.png, operator-phone.png,
trace-phone.png.
"""

from __future__ import annotations

import base64
import os
import re
import smtplib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate import config
from mailgate.directory import open_url
from tests.e2e.conftest import ALICE, client_tls
from tests.support.browser import Browser, Page
from tests.support.gateway import Gateway
from tests.support.ports import accepts, free_port
from tests.support.waiting import wait_for
from tests.web.conftest import run

pytestmark = pytest.mark.e2e

HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>"
ADMIN_PASSWORD = "operator's secret"
DESKTOP = (1280, 900)
PHONE = (390, 844)


def screenshots() -> Path:
    folder = os.environ.get("MAILGATE_SCREENSHOTS")
    return (
        Path(folder) if folder else Path(__file__).resolve().parents[1] / "output" / "screenshots"
    )


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    (tmp_path / "admin-password").write_text(ADMIN_PASSWORD + "\n")
    web, admin = free_port(), free_port()
    gw = Gateway(tmp_path / "gw", overrides={
        "web": {"listen": [f"127.0.0.1:{web}"], "tls": True},
        "admin": {"listen": [f"127.0.0.1:{admin}"],
                  "password_file": str(tmp_path / "admin-password")},
        "server": {"workers": 1},
    })  # fmt: skip
    gw.ports_web = web  # type: ignore[attr-defined] # this test's own note on the gateway
    gw.add_user(*ALICE)
    gw.add_user("mallory", "mallory's password")
    gw.start("--no-delivery")  # messages stay in the queue, to be listed
    wait_for(lambda: accepts(web), timeout=20, what="the [web] listener")
    try:
        yield gw
    finally:
        gw.finish()


def send(gw: Gateway, subject: str) -> str:
    """One message from alice on 587; its queue id."""
    with smtplib.SMTP("127.0.0.1", gw.ports["submission"], timeout=10) as client:
        client.starttls(context=client_tls())
        client.login(*ALICE)
        body = (f"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: {subject}\r\n\r\n"
                "hello\r\n")  # fmt: skip
        client.mail("alice@example.org")
        client.rcpt("bob@example.net")
        code, reply = client.data(body.encode())
    assert code == 250, reply
    match = re.search(rb"queued as (\S+)", reply)
    assert match is not None
    return match.group(1).decode()


def admin_url(gw: Gateway, path: str = "/") -> str:
    return f"http://127.0.0.1:{gw.settings['admin']['listen'][0].rsplit(':', 1)[1]}{path}"


AUTH = {"Authorization": "Basic " + base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()}


async def overflows(page: Page) -> bool:
    """The page is wider than the viewport (a phone would scroll sideways)."""
    return bool(await page.evaluate(
        "document.documentElement.scrollWidth > document.documentElement.clientWidth"))  # fmt: skip


def test_pages_in_a_real_browser(gateway: Gateway, tmp_path: Path) -> None:
    gw = gateway
    held = send(gw, HOSTILE)
    send(gw, "an ordinary message")
    gw.cli("queue", "hold", held)
    cfg = config.load(gw.config, check_files=False)
    directory = open_url(cfg.directory.url, default_domain=cfg.directory.default_domain,
                         data_dir=cfg.base_dir)  # fmt: skip
    directory.set_suspended("mallory", True)
    # Basic auth is enforced on the real server too (the browser below sends it).
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(admin_url(gw), timeout=10)  # noqa: S310 - loopback http
    assert refused.value.code == 401
    out = screenshots()
    web_port = gw.ports_web  # type: ignore[attr-defined]

    async def go() -> None:
        async with Browser(tmp_path / "chromium") as browser:
            page = await browser.page()
            # --- the settings page, for people ---
            await page.viewport(*DESKTOP, mobile=False)
            url = f"https://127.0.0.1:{web_port}/settings?emailaddress=alice@example.org"
            assert await page.load(url) == 200
            shown = await page.evaluate(
                "[...document.querySelectorAll('[data-setting=port]')].map(e => e.textContent)"
            )
            assert shown == [str(gw.ports["submissions"]), str(gw.ports["submission"])]
            security = await page.evaluate(
                "[...document.querySelectorAll('[data-setting=security]')].map(e => e.textContent)"
            )
            assert security == ["SSL/TLS", "STARTTLS"]
            assert (
                await page.evaluate("document.querySelector('[data-setting=username]').textContent")
                == "alice"
            )
            assert "port 25 block" in await page.evaluate("document.body.innerText")
            await page.screenshot(out / "settings-desktop.png")
            await page.viewport(*PHONE, mobile=True)
            assert await page.load(url) == 200
            assert not await overflows(page)
            await page.screenshot(out / "settings-phone.png")
            # --- the operator pages ---
            await page.viewport(*DESKTOP, mobile=False)
            assert await page.load(admin_url(gw)) == 401  # no credentials: refused
            assert await page.load(admin_url(gw), headers=AUTH) == 200
            assert await page.evaluate("document.querySelectorAll('svg#traffic-chart').length") == 1
            assert (
                await page.evaluate("document.querySelectorAll('#traffic-chart rect').length") == 72
            )
            # the hostile subject is text in its cell; nothing it says became an element
            subjects = await page.evaluate(
                "[...document.querySelectorAll('[data-queue=held] [data-field=subject]')]"
                ".map(e => e.textContent)")  # fmt: skip
            assert subjects == [HOSTILE]
            assert await page.evaluate("document.querySelectorAll('script, img').length") == 0
            queue = await page.evaluate(
                "[...document.querySelectorAll('[data-figures=queue] li')].map(e => e.textContent)"
            )
            assert queue[:3] == ["1 active", "0 deferred", "1 held"], queue
            assert await page.evaluate(
                "[...document.querySelectorAll('[data-list=suspended] li')].map(e => e.textContent)"
            ) == ["mallory"]  # fmt: skip
            held_link = await page.evaluate(
                "document.querySelector('[data-queue=held] a').getAttribute('href')")  # fmt: skip
            assert held_link == f"/trace?q={held}"
            await page.screenshot(out / "operator-desktop.png")
            await page.viewport(*PHONE, mobile=True)
            assert await page.load(admin_url(gw), headers=AUTH) == 200
            assert not await overflows(page)
            await page.screenshot(out / "operator-phone.png")
            # --- a message's trace, from its link ---
            assert await page.load(admin_url(gw, held_link), headers=AUTH) == 200
            assert held in await page.evaluate("document.querySelector('h2').textContent")
            assert await page.evaluate("document.querySelectorAll('script, img').length") == 0
            await page.screenshot(out / "trace-phone.png")

    run(go)
    for name in ("settings-desktop", "settings-phone", "operator-desktop", "operator-phone",
                 "trace-phone"):  # fmt: skip
        assert (out / f"{name}.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

"""A real browser for the web pages' tests: Debian's headless `chromium`, driven over the
DevTools protocol with aiohttp's websocket client (nothing is downloaded at run time).

Owns: starting chromium on a free loopback debugging port with a throwaway profile and
everything that would reach the network in the background switched off, one page (tab) to
drive, and stopping the browser's whole process group. `Page` loads a URL and waits for its
load event, evaluates expressions in it (the rendered DOM), sets the viewport (desktop, phone)
and saves PNG screenshots.

    async with Browser(tmp_path / "profile") as browser:
        page = await browser.page()
        await page.load("http://127.0.0.1:8080/settings?emailaddress=a@example.org")
        ports = await page.evaluate("[...document.querySelectorAll('dd')].map(e => e.textContent)")
        await page.screenshot(path, width=390, height=844, mobile=True)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from tests.support.ports import accepts, free_port
from tests.support.processes import start_logged
from tests.support.waiting import wait_for_async

COMMAND_TIMEOUT = 30.0  # seconds for one DevTools command or page load (a loaded machine)


def chromium_flags(profile: Path, port: int) -> list[str]:
    flags = [
        "chromium", "--headless", "--disable-gpu", f"--remote-debugging-port={port}",
        "--remote-debugging-address=127.0.0.1", f"--user-data-dir={profile}",
        "--no-first-run", "--no-default-browser-check", "--disable-extensions",
        "--disable-background-networking", "--disable-sync", "--disable-component-update",
        "--disable-default-apps", "--metrics-recording-only", "--mute-audio",
        "--hide-scrollbars", "--force-device-scale-factor=1",
        # The test server's certificate is self-signed (the pages are what is tested here).
        "--ignore-certificate-errors", "about:blank",
    ]  # fmt: skip
    if os.geteuid() == 0:
        flags.insert(1, "--no-sandbox")  # chromium refuses to run as root with its sandbox
    return flags


class Browser:
    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Browser:
        self.profile.mkdir(parents=True, exist_ok=True)
        self.proc = start_logged(chromium_flags(self.profile, self.port),
                                 self.profile / "chromium.log")  # fmt: skip
        self.session = aiohttp.ClientSession()
        await wait_for_async(self._listens, timeout=60, what="chromium's DevTools endpoint")
        return self

    def _listens(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            log = (self.profile / "chromium.log").read_text(errors="replace")
            raise RuntimeError(f"chromium exited: {log[-2000:]}")
        return accepts(self.port)

    async def page(self) -> Page:
        """A new tab, driven through its own websocket."""
        assert self.session is not None
        async with self.session.put(f"http://127.0.0.1:{self.port}/json/new?about:blank") as r:
            target = await r.json()
        ws = await self.session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        page = Page(ws)
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        return page

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        tb: TracebackType | None) -> None:  # fmt: skip
        if self.session is not None:
            await self.session.close()
        if self.proc is not None and self.proc.poll() is None:
            # chromium's own process group (start_logged): the browser and its renderers
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await asyncio.to_thread(self.proc.wait, 10)


class Page:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """One DevTools command; its result (events seen meanwhile are kept in `events`)."""
        self.next_id += 1
        my_id = self.next_id
        await self.ws.send_json({"id": my_id, "method": method, "params": params or {}})
        async with asyncio.timeout(COMMAND_TIMEOUT):
            while True:  # bounded by the timeout
                message = json.loads((await self.ws.receive()).data)
                if message.get("id") == my_id:
                    if "error" in message:
                        raise RuntimeError(f"{method}: {message['error']}")
                    result: dict[str, Any] = message.get("result", {})
                    return result
                self.events.append(message)

    async def wait_event(self, method: str) -> dict[str, Any]:
        async with asyncio.timeout(COMMAND_TIMEOUT):
            while True:  # bounded by the timeout
                for i, event in enumerate(self.events):
                    if event.get("method") == method:
                        return self.events.pop(i)
                self.events.append(json.loads((await self.ws.receive()).data))

    async def load(self, url: str, headers: dict[str, str] | None = None) -> int:
        """Navigate and wait for the load event; the main document's HTTP status."""
        await self.send("Network.enable")
        await self.send("Network.setExtraHTTPHeaders", {"headers": headers or {}})
        self.events.clear()
        await self.send("Page.navigate", {"url": url})
        await self.wait_event("Page.loadEventFired")
        for event in self.events:
            if (event.get("method") == "Network.responseReceived"
                    and event["params"].get("type") == "Document"):  # fmt: skip
                return int(event["params"]["response"]["status"])
        return 0

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (the DevTools side: the page's
        Content-Security-Policy does not apply to it)."""
        result = await self.send("Runtime.evaluate",
                                 {"expression": expression, "returnByValue": True})  # fmt: skip
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def viewport(self, width: int, height: int, *, mobile: bool) -> None:
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
        )

    async def screenshot(self, path: Path, *, full_page: bool = True) -> Path:
        """A PNG of the page as laid out for the current viewport (all of it: full_page)."""
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": full_page}
        if full_page:
            metrics = await self.send("Page.getLayoutMetrics")
            size = metrics["cssContentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"],
                              "height": size["height"], "scale": 1}  # fmt: skip
        data = await self.send("Page.captureScreenshot", params)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path

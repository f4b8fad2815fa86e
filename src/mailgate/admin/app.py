"""The aiohttp application of `[admin] listen`, and the listener that serves it.

`make_app(context)` builds the application; a later module adds its pages with
`app.router.add_routes(...)` before `AdminServer.start()`. Handlers never block the event loop
(the delivery engine shares it): rendering the metrics of every process and the readiness
checks run in threads or with timeouts.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from mailgate import metrics
from mailgate.config import Listen

log = logging.getLogger(__name__)


@dataclass(slots=True)
class AdminContext:
    """What the handlers ask the running server.

    snapshot:  metric families of the supervisor's own state (the queue), computed on the
               event loop when /metrics is scraped (the engine's data is not thread-safe).
    readiness: the reasons mail cannot be accepted now; an empty list means ready.
    degraded:  what works in a lesser way while mail is accepted (said by /readyz's 200).
    """

    snapshot: Callable[[], Sequence[Metric]] = lambda: ()
    readiness: Callable[[], Awaitable[list[str]]] = field(default=lambda: _ready())
    degraded: Callable[[], Awaitable[list[str]]] = field(default=lambda: _ready())


async def _ready() -> list[str]:
    return []


CONTEXT = web.AppKey("mailgate.admin", AdminContext)


def make_app(context: AdminContext) -> web.Application:
    app = web.Application()
    app[CONTEXT] = context
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    return app


async def _metrics(request: web.Request) -> web.Response:
    families = list(request.app[CONTEXT].snapshot())
    body, content_type = await asyncio.to_thread(metrics.render, [_Static(families)])
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


async def _healthz(request: web.Request) -> web.Response:
    """200 while the process serves: an event loop that answers is all this says."""
    return web.Response(text="ok\n")


async def _readyz(request: web.Request) -> web.Response:
    """200 when mail can be accepted ("ready", or "ready, degraded" and a reason a line), else
    503 with one reason a line."""
    context = request.app[CONTEXT]
    reasons, degraded = await asyncio.gather(context.readiness(), context.degraded())
    if reasons:
        return web.Response(status=503, text="not ready\n" + "".join(f"{r}\n" for r in reasons))
    if degraded:
        return web.Response(text="ready, degraded\n" + "".join(f"{r}\n" for r in degraded))
    return web.Response(text="ready\n")


class _Static(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


class AdminServer:
    """The listening sockets serving one application: `[admin] listen`, and `[web] listen`
    (service="web", HTTPS when handed a context)."""

    def __init__(self, app: web.Application, *, service: str = "admin") -> None:
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self.service = service

    async def start(
        self, addresses: Sequence[Listen], *, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        await self._runner.setup()
        for address in addresses:
            site = web.TCPSite(self._runner, address.host, address.port, reuse_address=True,
                               ssl_context=ssl_context)  # fmt: skip
            await site.start()
            log.info("listening service=%s address=%s tls=%s", self.service, address,
                     "yes" if ssl_context else "no")  # fmt: skip

    async def stop(self) -> None:
        await self._runner.cleanup()

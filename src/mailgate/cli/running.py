"""What `mailgate serve` needs to be operated: counting, the admin listener, reloads.

Owns: the per-run metrics directory (spool/run/metrics, emptied at each start), building the
`[admin]` application with the supervisor's queue gauges and readiness checks, validating a
configuration for `reload` (the same checks as `check-config`), and the reload status file
(spool/run/reload.json) through which `mailgate reload` learns what the server did with its
signal. Must not: serve mail; cli/serve.py calls these and owns the processes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailgate import config
from mailgate.config import Config

if TYPE_CHECKING:
    from aiohttp import web
    from prometheus_client.metrics_core import Metric

    from mailgate.admin.app import AdminServer
    from mailgate.admin.health import Readiness
    from mailgate.directory import Directory
    from mailgate.receive.tls import ReloadingContext
    from mailgate.spool.api import SpoolStore

log = logging.getLogger("mailgate.serve")


def run_dir(cfg: Config) -> Path:
    return cfg.spool.path / "run"


def enable_metrics(cfg: Config) -> None:
    """Count in files under spool/run/metrics from now on, in this process and its workers.

    Before any worker forks and before anything is counted: prometheus-client picks where a
    value lives when the value is created, at first use (see metrics.py).
    """
    import shutil
    import sys

    run_dir(cfg).mkdir(mode=0o700, exist_ok=True)  # the spool's own modes (ARCHITECTURE)
    directory = run_dir(cfg) / "metrics"
    if directory.exists():
        shutil.rmtree(directory)  # the previous run's counts must not add up with ours
    directory.mkdir(mode=0o700)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    if "prometheus_client.values" in sys.modules:  # imported already (cli/limits -> metrics)
        from prometheus_client import values

        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call] # untyped


def validate(path: Path) -> Config:
    """The configuration at `path`, checked like `check-config`; raises ConfigError."""
    from mailgate.cli.check_config import check

    cfg = config.load(path, check_files=True)
    check(cfg)
    return cfg


def needs_restart(old: Config, new: Config) -> list[str]:
    """Keys a reload cannot apply (sockets and processes): named in the log, kept as they are."""
    keys = [
        ("submission.listen", old.submission.listen, new.submission.listen),
        ("submissions.listen", old.submissions.listen, new.submissions.listen),
        ("smarthost.listen", old.smarthost.listen, new.smarthost.listen),
        ("admin.listen", old.admin.listen, new.admin.listen),
        ("admin.password_file", old.admin.password_file, new.admin.password_file),
        ("web", old.web, new.web),
        ("server.workers", old.server.workers, new.server.workers),
        ("spool", old.spool, new.spool),
        ("log.format", old.log.format, new.log.format),
        # The delivery engine (MX resolution, TLS policies, their caches) is built once.
        ("delivery", old.delivery, new.delivery),
        ("directory.url", old.directory.url, new.directory.url),
        ("trace", old.trace, new.trace),
    ]
    return [name for name, a, b in keys if a != b]


# --- the reload status file --------------------------------------------------------------------


def reload_status_path(cfg: Config) -> Path:
    return run_dir(cfg) / "reload.json"


def read_reload_status(cfg: Config) -> dict[str, Any]:
    try:
        data = json.loads(reload_status_path(cfg).read_text())
    except (OSError, ValueError):
        return {"generation": 0}
    return data if isinstance(data, dict) else {"generation": 0}


def write_reload_status(
    cfg: Config, *, ok: bool, error: str = "", kept: Sequence[str] = ()
) -> None:
    """One reload's result for `mailgate reload` (atomic: written aside, then renamed)."""
    path = reload_status_path(cfg)
    status = {
        "generation": int(read_reload_status(cfg).get("generation", 0)) + 1,
        "pid": os.getpid(),
        "at": time.time(),
        "ok": ok,
        "error": error,
        "needs_restart": list(kept),
    }
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("reload status not written path=%s: %s", path, e)


# --- the admin listener --------------------------------------------------------------------


def queue_families(snapshot: Callable[[], tuple[dict[str, int], float]] | None) -> list[Metric]:
    """mailgate_queue_messages{state} and the oldest entry's age, from the delivery engine."""
    from prometheus_client.core import GaugeMetricFamily

    if snapshot is None:
        return []
    counts, oldest = snapshot()
    queue = GaugeMetricFamily(
        "mailgate_queue_messages", "Spool entries by state (active, deferred, held)",
        labels=["state"],
    )  # fmt: skip
    for state, n in counts.items():
        queue.add_metric([state], n)
    age = GaugeMetricFamily(
        "mailgate_queue_oldest_message_age_seconds",
        "Age of the oldest entry in the spool (0 when empty)",
        value=oldest,
    )
    return [queue, age]


async def start_admin(
    cfg: Config,
    *,
    snapshot: Callable[[], tuple[dict[str, int], float]] | None,
    store: SpoolStore | None = None,
) -> tuple[AdminServer, Readiness] | None:
    """Serve /metrics, /healthz, /readyz and the operator pages on `[admin] listen`; None when
    it is empty. `store`: the delivery engine's spool (else one is opened for the pages)."""
    if not cfg.admin.listen:
        return None
    from mailgate.admin.app import AdminContext, AdminServer, make_app
    from mailgate.admin.health import Readiness
    from mailgate.cli.common import open_directory

    # check=False: a PostgreSQL directory that is down when the server starts must make
    # /readyz answer 503 with the reason, not stop the server.
    directory = open_directory(cfg, check=False)
    state_ping = None
    if cfg.state.url:
        from mailgate.limits.shared import SharedState

        state_ping = SharedState(cfg.state.url, cfg.state.prefix).check
    readiness = Readiness(
        spool=cfg.spool.path,
        min_free=cfg.limits.max_message_size,
        clamd=cfg.scanner.clamd,
        directory_query=directory.list_domains,
        state_ping=state_ping,
    )
    context = AdminContext(snapshot=lambda: queue_families(snapshot), readiness=readiness.reasons,
                           degraded=readiness.degraded)  # fmt: skip
    app = make_app(context)
    _add_operator_pages(app, cfg, directory, store)
    server = AdminServer(app)
    await server.start(cfg.admin.listen)
    return server, readiness


CERT_CHECK_INTERVAL = 60.0  # seconds between two looks at the [tls] files for [web]


class WebListener:
    """`[web] listen` in the supervisor; with `[web] tls`, the certificate is reloaded in place
    when its files change (ACME renewals), like the mail listeners' (receive/tls.py)."""

    def __init__(self, server: AdminServer, watch: asyncio.Task[None] | None) -> None:
        self.server = server
        self.watch = watch

    async def stop(self) -> None:
        if self.watch is not None:
            self.watch.cancel()
        await self.server.stop()


async def start_web(cfg: Config) -> WebListener | None:
    """Serve `[web] listen` (autoconfig, autodiscover, .mobileconfig, /settings); HTTPS with the
    [tls] certificate when `[web] tls`. None when it is empty."""
    if not cfg.web.listen:
        return None
    from mailgate.admin.app import AdminServer
    from mailgate.cli.common import open_directory
    from mailgate.receive.tls import ReloadingContext
    from mailgate.web.public import WebContext, make_web_app

    directory = open_directory(cfg, check=False)
    context = WebContext(cfg=cfg, is_managed=directory.is_managed)
    server = AdminServer(make_web_app(context), service="web")
    tls = ReloadingContext(cfg.tls.cert, cfg.tls.key) if cfg.web.tls else None
    await server.start(cfg.web.listen, ssl_context=tls.context if tls else None)
    watch = asyncio.get_running_loop().create_task(_watch_certificate(tls)) if tls else None
    return WebListener(server, watch)


async def _watch_certificate(tls: ReloadingContext) -> None:
    while True:  # until cancelled by WebListener.stop()
        await asyncio.sleep(CERT_CHECK_INTERVAL)
        await asyncio.to_thread(tls.maybe_reload)


def _add_operator_pages(
    app: web.Application, cfg: Config, directory: Directory, store: SpoolStore | None
) -> None:
    """`/` and `/trace` on the admin application, their figures from mailgate.status."""
    from functools import partial

    from mailgate import status
    from mailgate.spool import open_store
    from mailgate.web.operator import OperatorContext, add_operator_pages

    if store is None:
        store = open_store(cfg.spool)
    context = OperatorContext(
        hostname=cfg.hostname,
        overview=partial(status.overview, store, directory, cfg.trace.path),
        trace=cfg.trace.path,
        password_file=cfg.admin.password_file,
    )
    add_operator_pages(app, context)

"""`mailgate serve`: run every configured listener and the delivery engine in the foreground.

This is where the objects are wired together: config -> directory, spool, policy, scanner,
signer, acceptor, listeners, engine. SIGTERM/SIGINT stop gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any

from mailgate import log as mglog
from mailgate.cli.common import load_config, open_directory
from mailgate.config import Config

log = logging.getLogger("mailgate.serve")


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the listeners and the delivery engine")
    p.add_argument("--no-delivery", action="store_true",
                   help="accept and spool only; do not run the delivery engine")  # fmt: skip
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    mglog.setup()
    cfg = load_config(args, check_files=True)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(cfg, deliver=not args.no_delivery))
    return 0


async def serve(cfg: Config, *, deliver: bool = True) -> None:
    from mailgate.accept import Acceptor
    from mailgate.deliver.engine import Engine
    from mailgate.limits import AuthGuard, Limits
    from mailgate.message.dkim import Signer
    from mailgate.policy import Policy
    from mailgate.receive.auth import Authenticator
    from mailgate.receive.serve import Listeners
    from mailgate.receive.session import Services
    from mailgate.receive.tls import ReloadingContext
    from mailgate.scan import Scanner
    from mailgate.spool.group import GroupCommitter
    from mailgate.spool import open_store

    directory = open_directory(cfg)
    store = open_store(cfg.spool)
    report = store.recover()
    log.info("spool recovered path=%s %s", cfg.spool.path, report)
    tls = None
    if cfg.submission.listen or cfg.submissions.listen or cfg.smarthost.listen:
        tls = ReloadingContext(cfg.tls.cert, cfg.tls.key)
    engine = Engine(cfg, store) if deliver else None
    policy = Policy(directory, smarthost_networks=cfg.smarthost.networks)
    acceptor = Acceptor(
        hostname=cfg.hostname,
        policy=policy,
        committer=GroupCommitter(store),
        scanner=Scanner(cfg.scanner),
        signer=Signer(directory),
        hop_limit=cfg.delivery.hop_limit,
        on_committed=(lambda env: engine.wake(env.id)) if engine else (lambda env: None),
    )
    limits = Limits(cfg.ratelimits)
    auth_guard = AuthGuard(cfg.ratelimits)
    services = Services(
        cfg=cfg, store=store, policy=policy, acceptor=acceptor, directory=directory,
        authenticator=Authenticator(directory), tls=tls.context if tls else None,
        limits=limits, auth_guard=auth_guard,
    )  # fmt: skip
    listeners = Listeners(services)
    await listeners.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    engine_task = loop.create_task(engine.run()) if engine else None
    log.info("mailgate started hostname=%s", cfg.hostname)
    next_snapshot = loop.time() + cfg.ratelimits.snapshot_interval
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 5.0)
        except TimeoutError:
            if tls is not None:
                tls.maybe_reload()
            if loop.time() >= next_snapshot:
                next_snapshot = loop.time() + cfg.ratelimits.snapshot_interval
                await _write_limits_snapshot(cfg, limits, auth_guard)
    log.info("mailgate stopping")
    await listeners.stop()
    await _write_limits_snapshot(cfg, limits, auth_guard)
    if engine is not None and engine_task is not None:
        await engine.stop()
        await asyncio.wait({engine_task}, timeout=10.0)
    log.info("mailgate stopped")


async def _write_limits_snapshot(cfg: Config, limits: Any, guard: Any) -> None:
    """For `mailgate limits report`; a full disk must not stop the server."""
    from mailgate.limits import snapshot_path

    try:
        await asyncio.to_thread(limits.write_snapshot, snapshot_path(cfg.spool.path),
                                extra={"auth": guard.snapshot()})  # fmt: skip
    except OSError as e:
        log.warning("limits snapshot not written: %s", e)

"""`mailgate reload`: make the running `mailgate serve` re-read its configuration.

Checks the file first, like `check-config` (a broken file is refused here, with the error,
and the server is not disturbed), then sends SIGHUP to the server that holds
spool/serve.lock and waits for its answer in spool/run/reload.json (cli/running.py).
Existing connections and transactions finish with the configuration they started with.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import signal
import time
from typing import Any

from mailgate.cli import running
from mailgate.cli.common import CommandError, config_path

WAIT = 10.0  # seconds for the server's answer


def register(sub: Any) -> None:
    p = sub.add_parser("reload", help="re-read configuration, certificates and directory")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = running.validate(config_path(args))  # raises ConfigError naming the key
    pid = _server_pid(cfg.spool.path / "serve.lock")
    before = running.read_reload_status(cfg).get("generation", 0)
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        status = running.read_reload_status(cfg)
        if status.get("generation", 0) != before:
            if not status.get("ok"):
                raise CommandError(f"reload refused: {status.get('error', '?')}")
            kept = status.get("needs_restart") or []
            note = f" ({', '.join(kept)} take effect at the next restart)" if kept else ""
            print(f"reloaded: mailgate serve pid {pid}{note}")
            return 0
        time.sleep(0.05)
    raise CommandError(f"reload: mailgate serve pid {pid} did not answer within {WAIT:g}s")


def _server_pid(lock: os.PathLike[str]) -> int:
    """The pid of the `mailgate serve` holding the spool lock; an error when none does."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        raise CommandError("reload: no mailgate serve is running (no spool/serve.lock)") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 64).decode("ascii", "replace").strip()
            with contextlib.suppress(ValueError):
                return int(text)
            raise CommandError(f"reload: cannot read the server's pid from {lock}") from None
        raise CommandError("reload: no mailgate serve is running on this spool")
    finally:
        os.close(fd)

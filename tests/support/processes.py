"""Servers that tests start as child processes: start with a log file, see them listen, stop.

Owns: `start_logged` (the child writes stdout and stderr to a log file, in its own session so
that a stop never reaches the test runner) and `terminate` (SIGTERM, a bounded wait, then
SIGKILL). Whether a port listens is `tests.support.ports.accepts`.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path


def start_logged(argv: Sequence[str], log_path: Path,
                 env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
    with log_path.open("ab") as log:
        return subprocess.Popen(list(argv), stdout=log, stderr=log, env=env,
                                start_new_session=True)  # fmt: skip


def terminate(proc: subprocess.Popen[bytes] | None) -> None:
    """Stop `proc` (if it still runs): SIGTERM, up to 20 s, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)

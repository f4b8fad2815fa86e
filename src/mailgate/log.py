"""Logging setup: one line per event, `key=value` fields, greppable like Postfix's mail log.

Every line carries the session id (`sid=`) and, once known, the queue id (`qid=`).
Never log passwords, AUTH payloads or message bodies.
"""

from __future__ import annotations

import logging
import os
import sys
import time

_FORMAT = "%(asctime)s %(levelname)s mailgate[%(process)d] %(name)s: %(message)s"


def setup(level: str | None = None) -> None:
    """Log to stderr; the level comes from $MAILGATE_LOG_LEVEL (default INFO)."""
    chosen = (level or os.environ.get("MAILGATE_LOG_LEVEL") or "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(chosen)


class Throttle:
    """At most one log line per `interval` seconds for a recurring condition (a database down).

    `if throttle.ready(): log.warning(...)`; thread-safe enough for a log line (a race logs twice).
    """

    def __init__(self, interval: float = 60.0) -> None:
        self._interval = interval
        self._next_at = 0.0

    def ready(self) -> bool:
        now = time.monotonic()
        if now < self._next_at:
            return False
        self._next_at = now + self._interval
        return True

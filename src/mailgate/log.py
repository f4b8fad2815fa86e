"""Logging setup: one line per event, `key=value` fields, greppable like Postfix's mail log.

Every line carries the session id (`sid=`) and, once known, the queue id (`qid=`).
Never log passwords, AUTH payloads or message bodies.
"""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname)s mailgate[%(process)d] %(name)s: %(message)s"


def setup(level: str | None = None) -> None:
    """Log to stderr; the level comes from $MAILGATE_LOG_LEVEL (default INFO)."""
    chosen = (level or os.environ.get("MAILGATE_LOG_LEVEL") or "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(chosen)

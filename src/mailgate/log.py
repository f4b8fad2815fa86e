"""Logging setup: one line per event, `key=value` fields, greppable like Postfix's mail log.

Every line carries the session id (`sid=`) and, once known, the queue id (`qid=`).
Never log passwords, AUTH payloads or message bodies.

`[log] format = "json"` writes the same events as one JSON object a line: `time`, `level`,
`pid`, `logger` and `message` (the text line's parts), plus every `key=value` field of the
message as its own member (`qid`, `sid`, `status`, ...), so that `jq 'select(.qid == "X")'`
works without parsing the text again. A field never replaces one of the five fixed members.

One escaping rule for every logged value, applied here and not at call sites: both formatters
render each record's message through `text.visible()`, so an address, EHLO name or header a
client chose can never put a CR, LF, U+2028 or ESC into the log (a fake log line, a terminal
escape). A traceback keeps its own line breaks; each of its lines is escaped the same way.

Cost (issue #19): a worker logs about five lines per message, so a line's cost is per-message
work. The standard library's own switches for that are used (the logging HOWTO, "Optimization":
no caller look-up, no thread or multiprocessing names, which no format here shows), the time
stamp's seconds are formatted once per second, and the text line is one f-string instead of
`%`-formatting a dict of the record. The lines are byte for byte what the format says.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any

from mailgate.text import visible

_FORMAT = "%(asctime)s %(levelname)s mailgate[%(process)d] %(name)s: %(message)s"
# key=value, key="quoted value" or key=<address>; keys as the code writes them.
_FIELD = re.compile(
    r"""(?:^|(?<=\s))([a-z][a-z0-9_.-]*)=("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|\S*)"""
)
_FIXED = frozenset({"time", "level", "pid", "logger", "message", "exc"})


class Formatter(logging.Formatter):
    """The standard text formatter, with every control character of a message made visible."""

    _second = -1  # the second whose "%Y-%m-%d %H:%M:%S" is _second_text (one strftime a second)
    _second_text = ""

    def format(self, record: logging.LogRecord) -> str:
        if self._fmt != _FORMAT or record.exc_info or record.stack_info:
            return super().format(record)
        # _FORMAT, written out: the same bytes as `%`-formatting it, without building a dict.
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        return visible(f"{record.asctime} {record.levelname} mailgate[{record.process}] "
                       f"{record.name}: {record.message}")  # fmt: skip

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None or self.datefmt is not None or self.default_msec_format is None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return self.default_msec_format % (self._second_text, record.msecs)

    def formatMessage(self, record: logging.LogRecord) -> str:
        return visible(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return _lines_visible(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _lines_visible(super().formatStack(stack_info))


def _lines_visible(text: str) -> str:
    return "\n".join(visible(line) for line in text.split("\n"))


class JsonFormatter(Formatter):
    """One JSON object per record (no newline inside: tracebacks are one string member)."""

    def format(self, record: logging.LogRecord) -> str:
        message = visible(record.getMessage())
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "pid": record.process,
            "logger": record.name,
            "message": message,
        }
        for key, value in _FIELD.findall(message):
            if key in _FIXED or key in out:
                continue
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1].replace("\\" + value[0], value[0])
            out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def setup(level: str | None = None, fmt: str = "text") -> None:
    """Log to stderr; the level comes from $MAILGATE_LOG_LEVEL (default INFO).

    `fmt` is `[log] format`: "text" (default) or "json".
    """
    chosen = (level or os.environ.get("MAILGATE_LOG_LEVEL") or "INFO").upper()
    # The logging HOWTO's "Optimization" switches for what no line here shows: the caller's
    # file and line (a frame walk per record), the thread's and the multiprocessing names.
    # The process id stays: both formats show it.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else Formatter(_FORMAT))
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

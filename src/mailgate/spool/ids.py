"""Queue ids: the names of spool entries, of their files, and of the message in every log line.

Owns: the format of a queue id and its generation. Must not: touch files (whether an id is
already taken is checked by spool/journal.py).

A queue id is 14 characters of [0-9A-Z]: 9 for the milliseconds since the Unix epoch in base 36
(fixed width, so ids sort by time until the year 5138), then 5 random characters. Ids made in one
process are distinct (a per-process counter steps the random part within one millisecond); ids
made by different processes in the same millisecond differ with probability 1 - 36**-5 per pair,
and the store refuses an id that is already on disk. Upper-case letters and digits are safe as a
file name on every file system and need no quoting in logs or in `mailgate queue show ID`.
"""

from __future__ import annotations

import random
import re
import threading
import time

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_TIME_CHARS = 9
_RANDOM_CHARS = 5
_RANDOM_SPACE = len(ALPHABET) ** _RANDOM_CHARS
QUEUE_ID_LENGTH = _TIME_CHARS + _RANDOM_CHARS

# Accept any reasonable id, not only the ones this module makes: a spool written by an older or
# newer version stays readable. The bound keeps a file name short and rules out "..", "/" etc.
_QUEUE_ID_RE = re.compile(r"[0-9A-Z]{6,32}")

_lock = threading.Lock()
_last_ms = -1
_last_random = 0


def new_queue_id() -> str:
    """A fresh queue id: time-sortable, unique within this process, random across processes."""
    global _last_ms, _last_random
    ms = time.time_ns() // 1_000_000
    with _lock:
        if ms <= _last_ms:
            # Same millisecond (or the clock went back): stay on the last time prefix and step
            # the random part, so that ids from this process never repeat and still sort.
            ms = _last_ms
            rnd = (_last_random + 1) % _RANDOM_SPACE
        else:
            rnd = random.randrange(_RANDOM_SPACE)  # reseeded in each forked worker
        _last_ms, _last_random = ms, rnd
    return _base36(ms, _TIME_CHARS) + _base36(rnd, _RANDOM_CHARS)


def is_queue_id(text: str) -> bool:
    """Whether `text` has the shape of a queue id (so it can be used as a file name)."""
    return _QUEUE_ID_RE.fullmatch(text) is not None


def _base36(value: int, width: int) -> str:
    digits = []
    for _ in range(width):
        value, digit = divmod(value, len(ALPHABET))
        digits.append(ALPHABET[digit])
    return "".join(reversed(digits))

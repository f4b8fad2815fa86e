"""MIME bombs: how long the attachment walk takes to refuse them (seconds, not a test).

The unit tests (tests/unit/test_attachments.py, tests/scan/test_scanner.py) check that each bomb
is refused with 554 5.6.0, in little memory and without asking clamd; how fast that happens
depends on the machine and its load, so it is measured here instead. Each case is refused
--runs times (bounded); prints one JSON object per case with the median and the largest time
and the bound it was once asserted against ("reference_s"), then a {"summary": true} object.

    python bench/bench_mime_bombs.py            # a few seconds
    python bench/bench_mime_bombs.py --runs 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from mailgate.config import DEFAULT_BLOCKED_EXTENSIONS  # noqa: E402
from mailgate.errors import Rejected  # noqa: E402
from mailgate.scan.attachments import find_blocked  # noqa: E402

HEAD = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: t\r\nMIME-Version: 1.0\r\n"


def nested(depth: int) -> bytes:
    """`depth` multiparts each inside the previous one (about 1 MB at 20,000)."""
    opening = b"".join(
        b'Content-Type: multipart/mixed; boundary="n%d"\r\n\r\n--n%d\r\n' % (i, i)
        for i in range(depth + 1)
    )
    closing = b"".join(b"\r\n--n%d--\r\n" % i for i in reversed(range(depth + 1)))
    return HEAD + opening + b"Content-Type: text/plain\r\n\r\nbottom" + closing


def flat(parts: int) -> bytes:
    return HEAD + (
        b'Content-Type: multipart/mixed; boundary="f"\r\n\r\n' + b"--f\r\n\r\nx\r\n" * parts
    )


def encoded_words(count: int) -> bytes:
    field = b'Content-Disposition: attachment; filename="' + b"=?utf-8?q?a?= " * count + b'"'
    return HEAD + b"Content-Type: application/octet-stream\r\n" + field + b"\r\n\r\nx"


CASES: dict[str, tuple[Callable[[], bytes], float]] = {  # name -> (message, reference_s)
    "nested-20000": (lambda: nested(20_000), 1.0),
    "flat-200000": (lambda: flat(200_000), 1.0),
    "encoded-words-20000": (lambda: encoded_words(20_000), 0.5),
    "scanner-nested-10000": (lambda: nested(10_000), 1.0),
}


def time_refusal(message: bytes) -> float:
    started = time.perf_counter()
    try:
        find_blocked(message, DEFAULT_BLOCKED_EXTENSIONS)
    except Rejected:
        return time.perf_counter() - started
    raise AssertionError("the bomb was not refused")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="refusals per case (default 5)")
    args = parser.parse_args()
    worst = 0.0
    for name, (make, reference) in CASES.items():
        message = make()
        samples = [time_refusal(message) for _ in range(max(1, args.runs))]
        worst = max(worst, max(samples) / reference)
        print(json.dumps({"case": name, "bytes": len(message), "runs": len(samples),
                          "median_s": round(statistics.median(samples), 4),
                          "max_s": round(max(samples), 4), "reference_s": reference}))  # fmt: skip
    print(json.dumps({"summary": True, "worst_max_over_reference": round(worst, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

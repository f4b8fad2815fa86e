"""Scan overhead: Scanner.check per message, with and without clamd, 10 KB and 1 MB messages.

Starts its own clamd (tests/support/clamd.py: the test database, bytecode off, loopback TCP
and a Unix socket), then for each message size and each mode runs Scanner.check in a loop
bounded by a message count AND a time cap, sequentially and with --concurrency checks in
flight. Prints one JSON object per run and a final {"summary": true, ...} object.

Modes: "filetypes" (scanner.clamd = "": the MIME walk only), "clamd-unix" and "clamd-tcp"
(MIME walk then INSTREAM). The messages are a text part plus a base64 attachment of random
bytes (so clamd has to decode and look at all of it), which is clean.

    python bench/bench_scan.py                 # about 20 s on 2 cores
    python bench/bench_scan.py --messages 200 --max-seconds 5

Caveat: the database has two signatures, so clamd's matching cost is far below a production
clamd with the full ClamAV database (millions of signatures); the MIME decoding and I/O
costs are representative.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from mailgate.config import ScannerConfig  # noqa: E402
from mailgate.scan import Scanner  # noqa: E402
from tests.support.clamd import running_clamd  # noqa: E402


def make_message(size: int) -> bytes:
    """A clean message of about `size` bytes: text plus a base64 attachment."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = "alice@example.org"
    msg["To"] = "bob@example.net"
    msg["Subject"] = f"benchmark {size}"
    msg.set_content("Hello,\n\nthe figures are attached.\n\n-- \nAlice\n")
    attachment = os.urandom(max(0, (size - 1000) * 3 // 4))
    msg.add_attachment(attachment, maintype="application", subtype="pdf", filename="figures.pdf")
    return msg.as_bytes()


async def run_one(
    scanner: Scanner, message: bytes, *, messages: int, concurrency: int, max_seconds: float
) -> dict[str, Any]:
    latencies: list[float] = []
    deadline = time.monotonic() + max_seconds
    remaining = messages

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0 and time.monotonic() < deadline:
            remaining -= 1
            started = time.perf_counter()
            await scanner.check(message)
            latencies.append(time.perf_counter() - started)

    await scanner.check(message)  # warm-up: connection path, VERSION cache
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    latencies.sort()
    return {
        "checked": len(latencies),
        "seconds": round(seconds, 3),
        "msgs_per_s": round(len(latencies) / seconds, 1) if seconds else 0.0,
        "mb_per_s": round(len(latencies) * len(message) / seconds / 1e6, 1) if seconds else 0.0,
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="per run, at most")
    parser.add_argument("--max-seconds", type=float, default=2.0, help="per run, at most")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sizes", default="10000,1000000", help="comma-separated bytes")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args()

    use_uvloop = False
    if not args.no_uvloop:
        try:
            import uvloop

            use_uvloop = True
        except ImportError:
            pass

    results: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-scan-") as tmp,
        running_clamd(Path(tmp)) as clamd,
    ):
        modes = {"filetypes": "", "clamd-unix": clamd.unix_spec, "clamd-tcp": clamd.tcp_spec}
        for size in (int(s) for s in args.sizes.split(",")):
            message = make_message(size)
            for mode, spec in modes.items():
                for concurrency in (1, args.concurrency):
                    scanner = Scanner(ScannerConfig(clamd=spec))
                    coro = run_one(
                        scanner,
                        message,
                        messages=args.messages,
                        concurrency=concurrency,
                        max_seconds=args.max_seconds,
                    )
                    figures = uvloop.run(coro) if use_uvloop else asyncio.run(coro)
                    row = {"mode": mode, "size": len(message), "concurrency": concurrency}
                    row |= figures | {"uvloop": use_uvloop}
                    results.append(row)
                    print(json.dumps(row), flush=True)

    summary: dict[str, Any] = {"summary": True, "cpus": os.cpu_count()}
    for row in results:
        key = f"{row['mode']}_{row['size'] // 1000}k_c{row['concurrency']}_msgs_per_s"
        summary[key] = row["msgs_per_s"]
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Instructions per log line of `mailgate serve`'s text logging (log.setup), under callgrind.

    python3 bench/bench_log_line.py [--lines 2000]

Runs itself twice under valgrind's callgrind, logging 0 and then --lines lines like the
session's `connect` line to /dev/null through `mailgate.log.setup()`, and prints one JSON
object: the instructions per line (the difference divided by --lines). Deterministic, so it
compares on a busy machine; the write() system call (kernel time) is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def log_lines(count: int) -> None:
    import logging

    from mailgate import log as mglog

    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 # the handler's stream, kept open
    mglog.setup()
    log = logging.getLogger("mailgate.receive.session")
    for _ in range(count):
        log.info("sid=%s connect service=%s client=[%s]:%d port=%d",
                 "0A1B2C3D4E", "smarthost", "127.0.0.1", 40000, 10225)  # fmt: skip


def instructions(count: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
             __file__, "--child", str(count)],
            check=True, capture_output=True,
        )  # fmt: skip
        for line in out.read_text().splitlines():
            if line.startswith("summary:"):
                return int(line.split()[1])
    raise SystemExit("callgrind wrote no summary")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=2000)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        log_lines(a.child)
        return
    base, full = instructions(0), instructions(a.lines)
    print(json.dumps({"lines": a.lines, "instructions_per_line": round((full - base) / a.lines)}))


if __name__ == "__main__":
    main()

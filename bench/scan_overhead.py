"""Accepted msg/s and server CPU per message with and without scanning, through `mailgate serve`.

    python3 bench/scan_overhead.py [--sizes 10240,102400,1048576] [--messages 1000]

Starts a real clamd (tests/support/clamd.py: the test signature database, so clamd's own
matching cost is far below production's full database), then for each size runs the reference
load generator (../shared/bench/smtpload.py, smart host, 20 clients, one message per
connection) against a fresh mailgate without scanning ([scanner] clamd = "": blocked file types
are still checked) and with clamd, sampled by ../shared/bench/monitor.py. Prints one JSON line per
run and a summary line per size with the ratio. Loopback only; every run is bounded in messages
and time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.clamd import running_clamd  # noqa: E402

BENCH = Path(os.environ.get("BENCH_DIR", ROOT.parent / "shared" / "bench"))


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def run(size: int, messages: int, clamd: str, workdir: Path) -> dict[str, object]:
    inst = workdir / f"mg-{size}-{'scan' if clamd else 'plain'}"
    subprocess.run([sys.executable, str(ROOT / "bench" / "mailgate_instance.py"), str(inst),
                    "--clamd", clamd, "--relay", "127.0.0.1:9"], check=True,
                   capture_output=True)  # fmt: skip
    env = dict(os.environ, MAILGATE_LOG_LEVEL="WARNING")
    server = subprocess.Popen(
        [sys.executable, "-m", "mailgate", "-c", str(inst / "mailgate.toml"), "serve",
         "--no-delivery"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(10225)
        load = [sys.executable, str(BENCH / "smtpload.py"), "127.0.0.1", "10225",
                "--concurrency", "20", "--messages", str(messages), "--size", str(size),
                "--duration-cap", "120"]  # fmt: skip
        out = subprocess.run(
            [sys.executable, str(BENCH / "monitor.py"), "--root", str(server.pid),
             "--extra", json.dumps({"size": size, "scanning": bool(clamd)}), "--", *load],
            capture_output=True, text=True, check=True, timeout=300,
        ).stdout  # fmt: skip
        result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
        sent = int(str(result.get("sent", 0))) or 1
        result["server_cpu_ms_per_msg"] = round(float(str(result["server_cpu_s"])) * 1000 / sent, 2)
        return result
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10240,102400,1048576")
    ap.add_argument("--messages", type=int, default=1000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mg-scan-") as tmp, running_clamd(Path(tmp)) as cd:
        for size in (int(s) for s in a.sizes.split(",")):
            n = a.messages if size <= 102400 else max(100, a.messages // 10)
            plain = run(size, n, "", Path(tmp))
            print(json.dumps(plain), flush=True)
            scanned = run(size, n, cd.tcp_spec, Path(tmp))
            print(json.dumps(scanned), flush=True)
            print(json.dumps({
                "summary": True, "size": size,
                "msgs_per_s_plain": plain["msgs_per_s"],
                "msgs_per_s_scanning": scanned["msgs_per_s"],
                "cpu_ms_per_msg_plain": plain["server_cpu_ms_per_msg"],
                "cpu_ms_per_msg_scanning": scanned["server_cpu_ms_per_msg"],
            }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

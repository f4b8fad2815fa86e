"""The delivery engine's CPU per delivered message, under `mailgate serve` (issue #19).

    python bench/bench_engine_cpu.py --messages 2000 --runs 3            # 10 KiB, smart host
    python bench/bench_engine_cpu.py --messages 60 --size 10485760 --concurrency 10
    python bench/bench_engine_cpu.py --messages 1000 --runs 1 --profile /tmp/sup.prof
    python bench/bench_engine_cpu.py --messages 2000 --runs 1 --pyspy /tmp/sup-pyspy.txt

Per run: a fresh instance (bench/mailgate_instance.py's settings, on free loopback ports), a
sink (Postfix's `smtp-sink`; not `-M N`, which exits before its last 250), `mailgate serve`
(2 listener workers and the engine in the supervisor, unless --workers), then the shared
harness's load generator (../shared/bench/smtpload.py: --concurrency clients, one message per
connection) sends N messages to the smart-host port. The supervisor's CPU (utime + stime of
its threads, /proc/PID/stat) and the workers' are read before the load and once the spool is
empty again (every message delivered and its removal recorded). The CPU per message does not
depend on what else runs on the machine (the rates do: `load1` is printed beside them).

Prints one JSON object per run, then {"summary": true, ...} with the medians. With --profile
the supervisor runs under cProfile (its workers are forked with the profiler too, so their CPU
is inflated; use the profile for call counts, not the CPU figures). With --pyspy, `py-spy
record --nonblocking -f raw` samples the supervisor (every thread) while the load runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from mailgate_instance import make_instance  # noqa: E402
from procstat import child_pids, cpu_seconds, stop  # noqa: E402

from mailgate.spool.journal import JournalStore  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

# The reference harness (read-only), as bench/run-peers.sh finds it.
SMTPLOAD = Path(os.environ.get("SHARED_BENCH", "/work/shared/bench")) / "smtpload.py"
PYSPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


def greets(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(3) == b"220"
    except OSError:
        return False


def wait_until(what: str, check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # bounded by timeout
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def one_run(args: argparse.Namespace, n: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bench-engine-cpu-") as tmp:
        folder = Path(tmp) / "mg"
        sink_port, smarthost = free_port(), free_port()
        config = make_instance(
            folder,
            workers=args.workers,
            relay=f"127.0.0.1:{sink_port}",
            ports=(smarthost, free_port(), free_port()),
        )
        sink = subprocess.Popen(
            [args.sink, "-u", "nobody", "-m", "1000", f"127.0.0.1:{sink_port}", "1024"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        serve_cmd = [sys.executable]
        if args.profile:
            serve_cmd += ["-m", "cProfile", "-o", args.profile]
        serve_cmd += ["-m", "mailgate", "-c", str(config), "serve"]
        log = open(Path(tmp) / "serve.log", "wb")  # noqa: SIM115 (closed below)
        serve = subprocess.Popen(serve_cmd, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until("the smart host's greeting", lambda: greets(smarthost), 60)
            workers = child_pids(serve.pid)
            store = JournalStore(folder / "spool")
            sup0 = cpu_seconds(serve.pid)
            work0 = sum(cpu_seconds(w) for w in workers)
            spy = None
            if args.pyspy:
                spy = subprocess.Popen(
                    [PYSPY, "record", "-r", "200", "--nonblocking", "-f", "raw",
                     "-o", args.pyspy, "-p", str(serve.pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
            load = subprocess.run(
                [sys.executable, str(args.smtpload), "127.0.0.1", str(smarthost),
                 "--concurrency", str(args.concurrency), "--messages", str(args.messages),
                 "--size", str(args.size), "--duration-cap", str(args.max_seconds)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            client = json.loads(load.stdout)
            t0 = time.monotonic() - float(client["seconds"])
            wait_until("an empty spool", lambda: not store.ids(), args.max_seconds)
            delivered_s = time.monotonic() - t0
            sup = cpu_seconds(serve.pid) - sup0
            work = sum(cpu_seconds(w) for w in workers) - work0
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
            store.close()
        finally:
            stop(serve)
            sink.terminate()
            sink.wait()
            log.close()
        sent = int(client["sent"])
        return {
            "run": n,
            "label": args.label,
            "messages": args.messages,
            "size": args.size,
            "concurrency": args.concurrency,
            "sent": sent,
            "failed": client["failed"],
            "accepted_per_s": client["msgs_per_s"],
            "delivered_per_s": round(sent / delivered_s, 1),
            "supervisor_cpu_s": round(sup, 3),
            "supervisor_cpu_ms_per_msg": round(1000 * sup / sent, 3),
            "workers_cpu_ms_per_msg": round(1000 * work / sent, 3),
            "load1": os.getloadavg()[0],
            "profiled": bool(args.profile),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--size", type=int, default=10240)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=300.0)
    ap.add_argument("--label", default="")
    ap.add_argument("--profile", metavar="PATH", help="cProfile the supervisor (call counts)")
    ap.add_argument("--pyspy", metavar="PATH", help="py-spy the supervisor during the load")
    ap.add_argument("--smtpload", type=Path, default=SMTPLOAD)
    ap.add_argument("--sink", default=shutil.which("smtp-sink") or "/usr/sbin/smtp-sink")
    args = ap.parse_args()
    if not Path(args.sink).exists():
        raise SystemExit("smtp-sink not found (apt-get install postfix; never start it)")
    results = []
    for n in range(args.runs):
        result = one_run(args, n)
        print(json.dumps(result), flush=True)
        results.append(result)

    def median(key: str) -> float:
        return round(statistics.median(float(r[key]) for r in results), 3)  # type: ignore[arg-type]

    keys = ("supervisor_cpu_ms_per_msg", "workers_cpu_ms_per_msg", "delivered_per_s",
            "accepted_per_s")  # fmt: skip
    summary: dict[str, object] = {"summary": True, "label": args.label, "runs": args.runs}
    summary.update({k: median(k) for k in keys})
    summary["per_run_supervisor_cpu_ms_per_msg"] = [r["supervisor_cpu_ms_per_msg"] for r in results]
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()

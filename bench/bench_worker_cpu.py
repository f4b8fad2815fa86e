"""Server CPU per accepted message: the listener workers and the supervisor, from /proc.

    python3 bench/bench_worker_cpu.py [--runs 3] [--messages 2000] [--sub-messages 1000]
                                      [--workers 2] [--base-port 10600] [--only smarthost]
                                      [--keep DIR] [--profile-calls]

Makes an instance like bench/mailgate_instance.py (on other ports: 10625 smart host, 10687
submission, 10665 submissions; the sink `smtp-sink -M N` on 10626, started per run), starts
`mailgate serve`, and for each scenario runs the shared load generator
(../shared/bench/smtpload.py: 20 clients, 10 KiB, one message per connection; submission with
STARTTLS and AUTH PLAIN) `--runs` times. Each run reads utime+stime of the supervisor and of
each worker (/proc/PID/stat, threads included) before the load and after the sink has received
every message, so the figures include delivery (the supervisor) and every thread of a worker.
Prints one JSON object per run and one summary object per scenario (medians), on stdout.

`--tree DIR`: measure another checkout (an older commit made with `git worktree add`), run
with its own .venv; the load, the sink and the measure stay this script's.

`--instructions`: instead, serve with `workers = 0` under valgrind's callgrind and print the
user-space instructions per message (deterministic: the figure to compare on a busy machine;
use --messages 300 or so: the server runs ~50 times slower).

`--profile-calls`: instead, serve with `[server] workers = 0` under cProfile for the smart-host
load (one run of --messages) and print the call counts per message, as JSON: total Python
calls, and the top functions (docs/PERFORMANCE.md "What each change did" uses these).
CPU figures of the machine's other work do not enter the per-process figures, but a busy
machine still stretches them a little (cache, frequency): compare runs made side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from procstat import child_pids, cpu_seconds, stop

from tests.support.gateway import toml_dumps

ROOT = Path(__file__).resolve().parents[1]
# The reference harness (read-only), as bench/run-peers.sh finds it.
SMTPLOAD = Path(os.environ.get("SHARED_BENCH", "/work/shared/bench")) / "smtpload.py"


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # bounded
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
                if s.recv(100).startswith(b"220"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"nothing answers on port {port}")


def make_instance(folder: Path, a: argparse.Namespace, workers: int) -> Path:
    mg = [a.python, "-m", "mailgate"]
    subprocess.run(
        [a.python, str(a.tree / "bench" / "mailgate_instance.py"), str(folder),
         "--workers", str(workers), "--relay", f"127.0.0.1:{a.base_port + 26}"],
        check=True, capture_output=True,
    )  # fmt: skip
    config = folder / "mailgate.toml"
    data = tomllib.loads(config.read_text())
    data["submission"]["listen"] = [f"127.0.0.1:{a.base_port + 87}"]
    data["submissions"]["listen"] = [f"127.0.0.1:{a.base_port + 65}"]
    data["smarthost"]["listen"] = [f"127.0.0.1:{a.base_port + 25}"]
    config.write_text(toml_dumps(data))
    subprocess.run([*mg, "-c", str(config), "check-config"], check=True, capture_output=True)
    return config


def scenario_args(name: str, a: argparse.Namespace) -> tuple[int, list[str]]:
    if name == "smarthost":
        return a.messages, [str(a.base_port + 25)]
    return a.sub_messages, [str(a.base_port + 87), "--starttls", "--auth", "bench:benchpass"]


def one_run(
    name: str, a: argparse.Namespace, supervisor: int, sink_timeout: float = 120
) -> dict[str, Any]:
    count, extra = scenario_args(name, a)
    sink = subprocess.Popen(
        ["smtp-sink", "-u", "nobody", "-M", str(count), "-m", "1000",
         f"127.0.0.1:{a.base_port + 26}", "1024"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.3)  # let the sink bind before the first delivery (it only retries otherwise)
    workers = child_pids(supervisor)
    before = {pid: cpu_seconds(pid, reaped=True) for pid in [supervisor, *workers]}
    started = time.monotonic()
    load = subprocess.run(
        [sys.executable, str(SMTPLOAD), "127.0.0.1", *extra, "--concurrency", "20",
         "--messages", str(count), "--per-connection", "1", "--size", "10240",
         "--duration-cap", str(max(300, sink_timeout))],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    result = json.loads(load.stdout)
    try:
        sink.wait(timeout=sink_timeout)
        delivered = True
    except subprocess.TimeoutExpired:
        sink.kill()
        sink.wait()
        delivered = False
    elapsed = time.monotonic() - started
    after = {pid: cpu_seconds(pid, reaped=True) for pid in before}
    sent = max(result["sent"], 1)
    worker_s = sum(after[p] - before[p] for p in workers)
    supervisor_s = after[supervisor] - before[supervisor]
    return {
        "scenario": name,
        "sent": result["sent"],
        "failed": result["failed"],
        "delivered_all": delivered,
        "msgs_per_s": result["msgs_per_s"],
        "p99_ms": result["p99_ms"],
        "seconds_to_delivered": round(elapsed, 2),
        "worker_ms_per_msg": round(1000 * worker_s / sent, 3),
        "supervisor_ms_per_msg": round(1000 * supervisor_s / sent, 3),
        "server_ms_per_msg": round(1000 * (worker_s + supervisor_s) / sent, 3),
        "load1": os.getloadavg()[0],
        "errors": result.get("errors", {}),
    }


def serve(config: Path, python: str, *, profile: Path | None = None) -> subprocess.Popen[bytes]:
    cmd = [python]
    if profile is not None:
        cmd += ["-m", "cProfile", "-o", str(profile)]
    cmd += ["-m", "mailgate", "-c", str(config), "serve"]
    log = open(config.parent / "serve.log", "wb")  # noqa: SIM115 # lives as long as the server
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=config.parent)


def measure(a: argparse.Namespace, folder: Path) -> None:
    config = make_instance(folder, a, a.workers)
    server = serve(config, a.python)
    try:
        wait_port(a.base_port + 25)
        wait_port(a.base_port + 87)
        time.sleep(1.0)  # every worker bound
        commit = subprocess.run(["git", "-C", str(a.tree), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()  # fmt: skip
        print(json.dumps({"meta": "run", "commit": commit, "workers": a.workers,
                          "runs": a.runs, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                time.gmtime())}))  # fmt: skip
        for name in a.only.split(","):
            runs = []
            # one warm-up of 200 messages: first-use costs (imports, caches) are not per message
            warm = argparse.Namespace(**{**vars(a), "messages": 200, "sub_messages": 200})
            one_run(name, warm, server.pid)
            for _ in range(a.runs):
                r = one_run(name, a, server.pid)
                print(json.dumps(r), flush=True)
                runs.append(r)
            summary: dict[str, Any] = {"summary": True, "scenario": name, "runs": len(runs)}
            for key in ("worker_ms_per_msg", "supervisor_ms_per_msg", "server_ms_per_msg",
                        "msgs_per_s", "p99_ms"):  # fmt: skip
                summary[key] = round(statistics.median(r[key] for r in runs), 3)
            summary["failed"] = sum(r["failed"] for r in runs)
            print(json.dumps(summary), flush=True)
    finally:
        stop(server)


def _profiled(a: argparse.Namespace, folder: Path, messages: int) -> dict[Any, Any]:
    """cProfile's stats of a `workers = 0` server that took a warm-up of 200 messages and
    then `messages` more (0: the warm-up only)."""
    import pstats

    config = make_instance(folder, a, 0)
    prof = folder / "serve.prof"
    server = serve(config, a.python, profile=prof)
    try:
        wait_port(a.base_port + 25)
        one_run("smarthost", argparse.Namespace(**{**vars(a), "messages": 200}), server.pid)
        if messages:
            one_run("smarthost", argparse.Namespace(**{**vars(a), "messages": messages}),
                    server.pid)  # fmt: skip
    finally:
        stop(server)
    stats: dict[Any, Any] = pstats.Stats(str(prof)).stats  # type: ignore[attr-defined]
    return stats


def profile_calls(a: argparse.Namespace, folder: Path) -> None:
    """Per-message call counts: (stats after warm-up + N) - (stats after the warm-up) / N, so
    that start-up, imports and first-use costs drop out."""
    base = _profiled(a, folder / "base", 0)
    full = _profiled(a, folder / "full", a.messages)
    n = a.messages
    rows = []
    for key, (_, calls, tottime, cumtime, _) in full.items():
        b = base.get(key, (0, 0, 0.0, 0.0, None))
        rows.append((key, (calls - b[1]) / n, (tottime - b[2]) / n, (cumtime - b[3]) / n))
    by_file: dict[str, list[float]] = {}
    for (filename, _, _), calls, tottime, _ in rows:
        if filename == "~":
            where = "builtins"
        else:
            where = filename.split("site-packages/")[-1].split("src/")[-1]
            where = where.split("lib/python3")[-1] if "/lib/python3" in where else where
        entry = by_file.setdefault(where, [0.0, 0.0])
        entry[0] += calls
        entry[1] += tottime
    out = {
        "messages": n,
        "calls_per_msg": round(sum(r[1] for r in rows), 1),
        "by_file": [
            {"file": k, "calls_per_msg": round(v[0], 1), "tottime_us_per_msg": round(1e6 * v[1], 1)}
            for k, v in sorted(by_file.items(), key=lambda kv: -kv[1][1])[: a.top]
        ],
        "top_calls": [
            {"function": f"{Path(k[0]).name}:{k[1]}({k[2]})", "calls_per_msg": round(c, 2),
             "tottime_us_per_msg": round(1e6 * t, 1), "cumtime_us_per_msg": round(1e6 * ct, 1)}
            for k, c, t, ct in sorted(rows, key=lambda r: -r[1])[: a.top]
        ],
        "top_cumtime": [
            {"function": f"{Path(k[0]).name}:{k[1]}({k[2]})", "calls_per_msg": round(c, 2),
             "cumtime_us_per_msg": round(1e6 * ct, 1)}
            for k, c, t, ct in sorted(rows, key=lambda r: -r[3])[: a.top]
        ],
    }  # fmt: skip
    print(json.dumps(out, indent=1))


def _cost_by_object(dump: Path) -> dict[str, int]:
    """Exclusive instructions per shared object (the interpreter, libcrypto, ...) of a
    callgrind dump (its compressed name format: "ob=(n) name" the first time, "ob=(n)" after)."""
    names: dict[str, str] = {}
    cost: dict[str, int] = {}
    current = "?"
    after_calls = False
    for line in dump.read_text().splitlines():
        match = re.match(r"(c?ob)=\((\d+)\)(?: (.*))?$", line)
        if match:
            if match.group(3):
                names[match.group(2)] = match.group(3)
            if match.group(1) == "ob":
                current = names.get(match.group(2), "?")
            continue
        if line.startswith("calls="):
            after_calls = True  # the next cost line is a call's inclusive cost: not ours
            continue
        if line[:1].isdigit() or line[:1] in "+-*":
            parts = line.split()
            if len(parts) >= 2:
                if after_calls:
                    after_calls = False
                else:
                    cost[current] = cost.get(current, 0) + int(parts[1])
    return cost


def instructions(a: argparse.Namespace, folder: Path) -> None:
    """User-space instructions per message of a `workers = 0` server (listener and engine in
    one process) under valgrind's callgrind: deterministic, so independent of the machine's
    load (the kernel's work for the sockets and the disk is not in it). Counters are zeroed
    after a warm-up and dumped once every message of the measured run has been delivered."""
    config = make_instance(folder, a, 0)
    out = folder / "callgrind.out"
    log = open(folder / "serve.log", "wb")  # noqa: SIM115 # lives as long as the server
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", a.python, "-m",
         "mailgate", "-c", str(config), "serve"],
        stdout=log, stderr=subprocess.STDOUT, cwd=folder,
    )  # fmt: skip
    results: dict[str, Any] = {"meta": "instructions", "messages": a.messages}
    try:
        wait_port(a.base_port + 25, timeout=300)
        wait_port(a.base_port + 87, timeout=60)
        for name in a.only.split(","):
            warm = argparse.Namespace(**{**vars(a), "messages": 50, "sub_messages": 50})
            one_run(name, warm, server.pid, sink_timeout=600)
            subprocess.run(["callgrind_control", "-z", str(server.pid)], check=True,
                           capture_output=True)  # fmt: skip
            run = argparse.Namespace(**{**vars(a), "sub_messages": a.messages})
            r = one_run(name, run, server.pid, sink_timeout=600)
            dumps = set(folder.glob("callgrind.out.*"))
            subprocess.run(["callgrind_control", "-d", str(server.pid)], check=True,
                           capture_output=True)  # fmt: skip
            [dump] = set(folder.glob("callgrind.out.*")) - dumps
            by_object = _cost_by_object(dump)
            total = sum(by_object.values())
            # argon2 runs only when the credential cache misses, which depends on how slowly
            # the run went under valgrind: counted apart so that runs compare.
            argon2 = sum(v for k, v in by_object.items() if "argon2" in k)
            sent = max(r["sent"], 1)
            results[name] = {"instructions_per_msg": round(total / sent),
                             "without_argon2_per_msg": round((total - argon2) / sent),
                             "by_object_per_msg": {Path(k).name: round(v / sent) for k, v in
                                                   sorted(by_object.items(), key=lambda kv: -kv[1])
                                                   if v / total >= 0.005},
                             "sent": r["sent"], "failed": r["failed"],
                             "delivered_all": r["delivered_all"]}  # fmt: skip
    finally:
        stop(server)
    print(json.dumps(results))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sub-messages", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--base-port", type=int, default=10600)
    ap.add_argument("--only", default="smarthost,submission")
    ap.add_argument("--keep", type=Path, help="make the instance here and keep it")
    ap.add_argument("--profile-calls", action="store_true")
    ap.add_argument("--instructions", action="store_true")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument(
        "--tree",
        type=Path,
        default=ROOT,
        help="measure this checkout (its .venv and bench/mailgate_instance.py)",
    )
    a = ap.parse_args()
    a.python = str(a.tree / ".venv" / "bin" / "python")
    with tempfile.TemporaryDirectory(prefix="bench-worker-cpu-") as tmp:
        folder = a.keep or Path(tmp) / "instance"
        if a.profile_calls:
            profile_calls(a, folder)
        elif a.instructions:
            instructions(a, folder)
        else:
            measure(a, folder)


if __name__ == "__main__":
    main()

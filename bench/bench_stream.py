"""Large messages: a worker's memory and its responsiveness while ten 25 MB messages arrive.

Starts a real `mailgate serve` (tests/support/gateway.py) with one worker, a real clamd
(tests/support/clamd.py) and a recording sink as the relay, makes `example.org` a managed
domain that signs mail from 127.0.0.0/8 on the smart host (so every message is scanned by the
MIME walk and clamd, stamped and DKIM-signed), sends one small message to warm up, then sends
--count messages of --size bytes on concurrent smart-host connections while another
connection to the same worker sends NOOP after NOOP. It samples the RSS of the worker(s) and
their child processes (the MIME walk of a large message runs in one, scan/walker.py), summed,
and of the supervisor (delivery) from /proc every 20 ms.

Prints one JSON object: the RSS raise over the warmed-up baseline (peak minus baseline) of the
workers and of the supervisor, the NOOP latencies (max, p99, count) while the messages were
being sent and accepted and, for comparison, while the server was idle for 5 s before (the
latency the machine's other load causes by itself), the replies to the messages, and how long
it all took.

    python bench/bench_stream.py                      # ten 25 MB messages, MIME shape
    python bench/bench_stream.py --shape plain        # one text part, no MIME fields

Targets (issue #18): the workers' RSS raise < 150 MB in total; every NOOP answered within
100 ms. Bounded: every loop stops at --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import BinaryIO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.clamd import running_clamd
from tests.support.gateway import Gateway
from tests.support.ports import free_port
from tests.support.smtpsink import SmtpSink

MB = 1_000_000
IDLE_SECONDS = 5.0  # NOOPs on the idle server before the messages: the machine's own noise


def make_message(size: int, shape: str, seed: int) -> bytes:
    """A message of about `size` bytes from bench@example.org (CRLF lines)."""
    head = (
        "From: Bench <bench@example.org>\r\n"
        "To: someone@example.net\r\n"
        f"Subject: large message {seed}\r\n"
        "Date: Thu, 03 Dec 2026 12:00:00 +0000\r\n"
        f"Message-ID: <large{seed}@example.org>\r\n"
    )
    rng = random.Random(seed)
    if shape == "plain":
        line = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(76)) + "\r\n"
        body = line * ((size - len(head)) // len(line))
        return (head + "\r\n" + body).encode("ascii")
    boundary = "b1_bench_boundary"
    text = f"--{boundary}\r\nContent-Type: text/plain\r\n\r\nThe report is attached.\r\n"
    attach_head = (
        f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="report.dat"\r\n\r\n'
    )
    tail = f"\r\n--{boundary}--\r\n"
    mime = f"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary={boundary}\r\n\r\n"
    room = size - len(head) - len(mime) - len(text) - len(attach_head) - len(tail)
    raw = rng.randbytes(room * 3 // 4 * 76 // 78)
    encoded = base64.encodebytes(raw).replace(b"\n", b"\r\n")
    return (head + mime + text + attach_head).encode() + encoded + tail.encode()


def dot_stuff(message: bytes) -> bytes:
    if message.startswith(b"."):
        message = b"." + message
    return message.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


async def reply(reader: asyncio.StreamReader, limit: float) -> str:
    lines = []
    for _ in range(100):
        line = (await asyncio.wait_for(reader.readline(), limit)).decode()
        lines.append(line.rstrip("\r\n"))
        if len(line) < 4 or line[3] != "-":
            break
    return lines[-1]


async def send_one(
    port: int, wire: bytes, limit: float, marks: list[tuple[float, float]] | None = None
) -> str:
    """Send one message; `marks` gets (when its last byte was sent, when its reply came)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reply(reader, limit)
        for command in (b"EHLO bench.test\r\n", b"MAIL FROM:<bench@example.org>\r\n",
                        b"RCPT TO:<someone@example.net>\r\n", b"DATA\r\n"):  # fmt: skip
            writer.write(command)
            answer = await reply(reader, limit)
            if answer[:1] not in ("2", "3"):
                return answer
        view = memoryview(wire)
        for start in range(0, len(view), 256 * 1024):
            writer.write(view[start : start + 256 * 1024])
            await writer.drain()
        sent_at = time.monotonic()
        answer = await reply(reader, limit)
        if marks is not None:
            marks.append((sent_at, time.monotonic()))
        writer.write(b"QUIT\r\n")
        await writer.drain()
        return answer
    finally:
        writer.close()


def noops(port: int, stop: Event, out: Connection, limit: float) -> None:
    """NOOP after NOOP on one connection, in a process of its own (so that the senders'
    event loop in the benchmark process cannot delay the measurement); the latencies go
    back through `out`."""
    latencies: list[tuple[float, float]] = []  # (when it was sent, how long it took)
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as sock:
        reader = sock.makefile("rb")
        _read_reply(reader)
        sock.sendall(b"EHLO noop.test\r\n")
        _read_reply(reader)
        deadline = time.monotonic() + limit
        while not stop.is_set() and time.monotonic() < deadline:
            sent_at, started = time.monotonic(), time.perf_counter()
            sock.sendall(b"NOOP\r\n")
            _read_reply(reader)
            latencies.append((sent_at, time.perf_counter() - started))
            time.sleep(0.01)
        sock.sendall(b"QUIT\r\n")
    out.send(latencies)


def _read_reply(reader: BinaryIO) -> None:
    for _ in range(100):
        line = reader.readline()
        if len(line) < 4 or line[3:4] != b"-":
            return


def with_descendants(pids: list[int]) -> list[int]:
    """`pids` and every process below them (a worker's MIME-walk child, scan/walker.py)."""
    found: list[int] = []
    todo = list(pids)
    while todo and len(found) < 1000:  # bounded: a process tree of this server is small
        pid = todo.pop()
        found.append(pid)
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                pass
    return found


async def sample(pids: list[int], sup: int, stop: asyncio.Event,
                 peaks: dict[str, int], limit: float) -> None:  # fmt: skip
    deadline = time.monotonic() + limit
    while not stop.is_set() and time.monotonic() < deadline:
        tree = with_descendants(pids)
        peaks["worker_processes"] = max(peaks["worker_processes"], len(tree))
        peaks["workers"] = max(peaks["workers"], sum(rss_kb(p) for p in tree))
        peaks["supervisor"] = max(peaks["supervisor"], rss_kb(sup))
        await asyncio.sleep(0.02)


async def run(port: int, pids: list[int], sup: int, wires: list[bytes],
              max_seconds: float) -> dict[str, object]:  # fmt: skip
    stop = asyncio.Event()
    marks: list[tuple[float, float]] = []
    peaks = {"workers": 0, "supervisor": 0, "worker_processes": 0}
    sampler = asyncio.create_task(sample(pids, sup, stop, peaks, max_seconds))
    ctx = multiprocessing.get_context("fork")
    stop_pinger = ctx.Event()
    receive, send = ctx.Pipe(duplex=False)
    pinger = ctx.Process(target=noops, args=(port, stop_pinger, send, max_seconds))
    pinger.start()
    # The machine's own noise first: NOOPs while the server is idle (other users' load).
    await asyncio.sleep(IDLE_SECONDS)
    started = time.monotonic()
    answers = await asyncio.gather(
        *(send_one(port, w, max_seconds, marks) for w in wires), return_exceptions=True
    )
    elapsed = time.monotonic() - started
    all_sent = max((s for s, _ in marks), default=started)
    stop.set()
    stop_pinger.set()
    await sampler
    timed = await asyncio.to_thread(receive.recv)
    pinger.join(10)
    idle = sorted(t for at, t in timed if at < started - 0.2)  # the session was still opening
    lat = sorted(t for at, t in timed if at >= started)
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None
    # The worst NOOP while messages were still arriving, and once every message was in (the
    # scans, signing and commits; the MIME walks start as each message's data ends).
    receiving = [t for at, t in timed if started <= at < all_sent]
    accepting = [t for at, t in timed if at >= all_sent]
    return {
        "replies": [a if isinstance(a, str) else repr(a) for a in answers],
        "seconds": round(elapsed, 2),
        "noop_count": len(lat),
        "noop_max_ms": round(lat[-1] * 1000, 1) if lat else None,
        "noop_p99_ms": round(p99 * 1000, 1) if p99 is not None else None,
        "noop_median_ms": round(statistics.median(lat) * 1000, 2) if lat else None,
        "noop_max_ms_receiving": round(max(receiving) * 1000, 1) if receiving else None,
        "noop_max_ms_after_all_data": round(max(accepting) * 1000, 1) if accepting else None,
        "slow_noops": [  # (seconds after the start, ms) of every NOOP over 50 ms
            (round(at - started, 2), round(t * 1000, 1)) for at, t in timed if t > 0.05
        ],
        "data_sent_s": sorted(round(s - started, 2) for s, _ in marks),
        "replied_s": sorted(round(r - started, 2) for _, r in marks),
        "idle_noop_count": len(idle),
        "idle_noop_max_ms": round(idle[-1] * 1000, 1) if idle else None,
        "idle_noop_p99_ms": round(idle[min(len(idle) - 1, int(len(idle) * 0.99))] * 1000, 1)
        if idle
        else None,
        "peak_kb": peaks,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--size", type=int, default=25 * MB)
    ap.add_argument("--shape", choices=("mime", "plain"), default="mime")
    ap.add_argument("--max-seconds", type=float, default=300.0)
    # A diagnostic: how much of the NOOP latency is clamd's CPU on the same two cores.
    ap.add_argument("--clamd-nice", type=int, default=0, help="renice clamd by this much")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mgbench-stream-") as tmp:
        root = Path(tmp)
        sink = SmtpSink("127.0.0.1", free_port(), count_only=True).start()
        with running_clamd(root) as clamd:
            if a.clamd_nice:
                os.setpriority(os.PRIO_PROCESS, clamd.pid, a.clamd_nice)
            gw = Gateway(root / "gw", {
                "server": {"workers": 1},
                # clamd shares the two cores with everything else: give a scan 120 s rather
                # than 30 s, so that a slow clamd does not turn into 451s here.
                "scanner": {"clamd": clamd.unix_spec, "timeout": 120.0},
                "delivery": {"relay": f"127.0.0.1:{sink.port}"},
            })  # fmt: skip
            gw.cli("domain", "add", "example.org", "--allow-network", "127.0.0.0/8")
            gw.start()
            try:
                port = gw.ports["smarthost"]
                assert gw.proc is not None
                sup = gw.proc.pid
                pids = sorted(gw.pids() - {sup})
                warm = asyncio.run(send_one(port, dot_stuff(make_message(20_000, a.shape, 0)), 60))
                time.sleep(2)  # let the warm-up delivery finish and the heap settle
                base = {
                    "workers": sum(rss_kb(p) for p in with_descendants(pids)),
                    "supervisor": rss_kb(sup),
                }
                wires = [dot_stuff(make_message(a.size, a.shape, i + 1)) for i in range(a.count)]
                result = asyncio.run(run(port, pids, sup, wires, a.max_seconds))
                peaks = result.pop("peak_kb")
                assert isinstance(peaks, dict)
                out = {
                    "benchmark": "stream",
                    "shape": a.shape,
                    "clamd_nice": a.clamd_nice,
                    "count": a.count,
                    "size": a.size,
                    "workers": len(pids),
                    # the workers and their children (the MIME-walk process) at most at once
                    "worker_processes_max": peaks.pop("worker_processes"),
                    "warmup_reply": warm,
                    **result,
                    "baseline_rss_mb": {k: round(v / 1024, 1) for k, v in base.items()},
                    "rss_raise_mb": {
                        k: round((peaks[k] - base[k]) / 1024, 1) for k in ("workers", "supervisor")
                    },
                    "cpus": os.cpu_count(),
                    "loadavg": os.getloadavg(),
                }
                print(json.dumps(out))
                if any(not str(r).startswith("250") for r in out["replies"]):  # type: ignore[attr-defined]
                    why = [
                        ln for ln in gw.log_text().splitlines() if "deferred" in ln or "scan" in ln
                    ]
                    print("\n".join(why[-20:]), file=sys.stderr)
            finally:
                gw.stop()
                sink.stop()


if __name__ == "__main__":
    main()

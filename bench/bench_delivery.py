"""Delivery throughput: N spooled messages to a loopback sink through `delivery.relay`.

Enqueues N messages (10 KiB by default) into a fresh spool, starts a recording SMTP sink in a
separate process (tests/support/smtpsink.py, --count-only) on 127.0.0.1, runs the delivery
Engine against it until the spool is empty (bounded by --max-seconds), and prints one JSON
object: {"messages", "size", "seconds", "delivered_per_s", "engine_cpu_ms_per_msg",
"sink_accepted", "uvloop", ...}. The engine's CPU time is this process's (all its threads)
while it delivers; the sink runs in its own process and is not counted.

    python bench/bench_delivery.py --messages 2000
    python bench/bench_delivery.py --messages 2000 --no-pipelining   # the sink hides RFC 2920
    python bench/bench_delivery.py --messages 500 --profile /tmp/engine.prof   # cProfile
    python bench/bench_delivery.py --messages 5000 --client-only   # the SMTP client alone

--client-only skips the spool and the engine: --max-per-destination connections send the same
message over and over with `deliver.attempt.Connection`, and the CPU per message is the SMTP
client's (machine, adapter, event loop, system calls).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from mailgate.config import Config, DeliveryConfig, SpoolConfig  # noqa: E402
from mailgate.deliver.attempt import Connection, Transfer  # noqa: E402
from mailgate.deliver.engine import Engine  # noqa: E402
from mailgate.deliver.route import Host  # noqa: E402
from mailgate.spool.api import SpoolStore  # noqa: E402
from mailgate.spool.entry import Envelope, Recipient  # noqa: E402
from mailgate.spool.ids import new_queue_id  # noqa: E402
from mailgate.spool.journal import JournalStore  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.smtpsink import Behaviour, SmtpSink  # noqa: E402


def message(size: int, n: int) -> bytes:
    head = (
        f"From: Bench <bench@example.org>\r\nTo: <sink@example.net>\r\n"
        f"Subject: bench {n}\r\nMessage-ID: <bench-{n}@example.org>\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


def fill(store: SpoolStore, count: int, size: int) -> None:
    for n in range(count):
        data = message(size, n)
        env = Envelope(
            id=new_queue_id(),
            mail_from="bench@example.org",
            recipients=(Recipient(f"rcpt{n % 10}@example.net"),),
            size=len(data),
        )
        store.enqueue(env, data)


async def deliver(cfg: Config, store: SpoolStore, count: int, max_seconds: float) -> float:
    engine = Engine(cfg, store)
    started = time.perf_counter()
    task = asyncio.get_running_loop().create_task(engine.run())
    deadline = started + max_seconds
    while time.perf_counter() < deadline:  # bounded by --max-seconds
        if not engine._envelopes and not store.ids():  # everything delivered and removed
            break
        await asyncio.sleep(0.02)
    seconds = time.perf_counter() - started
    await engine.stop()
    await asyncio.wait_for(task, 30)
    return seconds


async def deliver_client_only(port: int, count: int, size: int, connections: int) -> float:
    """`count` deliveries of one message over `connections` connections; the seconds taken."""
    data = message(size, 0)
    env = Envelope(
        id=new_queue_id(),
        mail_from="bench@example.org",
        recipients=(Recipient("rcpt@example.net"),),
        size=len(data),
    )
    transfer = Transfer(env.id, env, env.recipients, data)
    host = Host("sink", "127.0.0.1", port)

    async def one_connection(n: int) -> None:
        conn = await Connection.open(
            host, helo="bench.example.org", tls_context=None, connect_timeout=10,
            command_timeout=30,
        )  # fmt: skip
        for _ in range(n):
            [result] = await conn.deliver(transfer)
            if result.status != "delivered":
                raise SystemExit(f"not delivered: {result.detail}")
        await conn.close()

    shares = [count // connections + (k < count % connections) for k in range(connections)]
    started = time.perf_counter()
    await asyncio.gather(*(one_connection(n) for n in shares if n))
    return time.perf_counter() - started


def run_engine(args: argparse.Namespace, port: int) -> tuple[float, float, int, float]:
    """Fill a fresh spool and deliver it with the Engine: seconds, CPU seconds, entries left,
    fill seconds."""
    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as tmp:
        cfg = Config(
            path=Path(tmp) / "mailgate.toml",
            hostname="bench.example.org",
            spool=SpoolConfig(Path(tmp) / "spool"),
            delivery=DeliveryConfig(
                relay=f"127.0.0.1:{port}",
                max_connections=args.max_connections,
                max_per_destination=args.max_per_destination,
            ),
        )
        store = JournalStore(cfg.spool.path)
        t0 = time.perf_counter()
        fill(store, args.messages, args.size)
        fill_seconds = time.perf_counter() - t0
        profiler = cProfile.Profile() if args.profile else None
        cpu0 = time.process_time()
        if profiler is not None:
            profiler.enable()
        seconds = asyncio.run(deliver(cfg, store, args.messages, args.max_seconds))
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        cpu = time.process_time() - cpu0
        left = len(store.ids())
    return seconds, cpu, left, fill_seconds


def serve_sink(port: int, *, pipelining: bool) -> None:
    """The sink process: tests/support/smtpsink.py counting only, until SIGTERM."""
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    sink = SmtpSink("127.0.0.1", port, count_only=True, behaviour=Behaviour(pipelining=pipelining))
    sink.start()
    print(f"listening {sink.host}:{sink.port}", flush=True)
    done.wait()
    sink.stop()
    print(f"accepted {sink.accepted_count}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=10240)
    parser.add_argument("--max-connections", type=int, default=50)
    parser.add_argument("--max-per-destination", type=int, default=10)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--no-pipelining", action="store_true", help="the sink hides PIPELINING")
    parser.add_argument("--profile", metavar="PATH", help="write cProfile stats of the delivery")
    parser.add_argument("--client-only", action="store_true", help="no spool, no engine")
    parser.add_argument("--serve-sink", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_sink is not None:
        serve_sink(args.serve_sink, pipelining=not args.no_pipelining)
        return

    use_uvloop = False
    if not args.no_uvloop:
        try:
            import uvloop

            uvloop.install()
            use_uvloop = True
        except ImportError:
            pass

    port = free_port()
    sink_args = ["--no-pipelining"] if args.no_pipelining else []
    sink = subprocess.Popen(
        [sys.executable, __file__, "--serve-sink", str(port), *sink_args],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert sink.stdout is not None
        ready = sink.stdout.readline()
        if not ready.startswith("listening"):
            raise SystemExit(f"sink did not start: {ready!r}")
        if args.client_only:
            cpu0 = time.process_time()
            seconds = asyncio.run(
                deliver_client_only(port, args.messages, args.size, args.max_per_destination)
            )
            cpu = time.process_time() - cpu0
            left, fill_seconds = 0, 0.0
        else:
            seconds, cpu, left, fill_seconds = run_engine(args, port)
    finally:
        sink.terminate()
        out, _ = sink.communicate(timeout=30)
    accepted = int(out.split("accepted")[-1].strip() or 0) if "accepted" in out else -1
    delivered = args.messages - left
    print(
        json.dumps(
            {
                "messages": args.messages,
                "size": args.size,
                "delivered": delivered,
                "sink_accepted": accepted,
                "seconds": round(seconds, 3),
                "delivered_per_s": round(delivered / seconds, 1),
                "engine_cpu_s": round(cpu, 3),
                "engine_cpu_ms_per_msg": round(1000 * cpu / max(delivered, 1), 3),
                "fill_seconds": round(fill_seconds, 3),
                "max_per_destination": args.max_per_destination,
                "uvloop": use_uvloop,
                "client_only": args.client_only,
                "sink_pipelining": not args.no_pipelining,
            }
        )
    )


if __name__ == "__main__":
    main()

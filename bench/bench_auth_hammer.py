"""AUTH hammering vs honest users: does an attacker on one address slow everyone else down?

Starts a real `mailgate serve --no-delivery` (tests/support/gateway.py) on loopback ports with
the default AUTH defence, then measures honest users alone ("idle") and while an attacker
hammers AUTH with wrong passwords ("attack"), in --rounds alternating phases so that drift on a
noisy machine hits both. Honest users connect from 127.0.0.3 and send one message per
connection (submission on 587: EHLO, STARTTLS, EHLO, AUTH PLAIN, MAIL, RCPT, DATA, QUIT); the
latency of a message is that whole connection. The attacker runs in a separate process (so it
does not share the honest clients' GIL), from 127.0.0.2, with --attackers threads that reconnect
and try AUTH PLAIN as the honest login and as random names; it pauses during idle phases.

What the attacker meets: 535 while its failures are counted (delayed from auth_delay_after),
454 at auth_refuse_after, then 421 at connect, then after auth_ban_after refused reconnects its
SYNs are dropped by the kernel ban (receive.kernelban): its connect() times out after
--attacker-timeout and it tries again at once.

Prints one JSON object: per phase the honest {"messages", "p50_ms", "p99_ms", "max_ms"}, the
medians of the phases' p99, the attacker's attempts and outcomes, "p99_ratio" (median attack
p99 / median idle p99) and "within_2x" (issue #6 asks for p99 under attack within 2x of idle).
Bounded in count (--messages per phase) and time (--max-seconds overall). Everything runs on one
machine; --pin (default) puts the attacker on its own CPU, as a remote attacker would be.

    python bench/bench_auth_hammer.py --messages 200 --attackers 8
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import multiprocessing
import os
import secrets
import smtplib
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from mailgate import config  # noqa: E402
from tests.support.gateway import Gateway  # noqa: E402

HONEST_IP = "127.0.0.3"
ATTACKER_IP = "127.0.0.2"
HONEST = ("alice", "correct horse battery")
MESSAGE = (
    b"From: alice@example.org\r\nTo: friend@remote.test\r\nSubject: bench\r\n\r\n"
    + b"Just a short note.\r\n" * 20
)


def tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the gateway's certificate is self-signed
    return ctx


def send_one(port: int, ctx: ssl.SSLContext) -> float:
    """One honest message on its own connection; seconds from connect to QUIT's reply."""
    began = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(HONEST_IP, 0)) as client:
        client.ehlo("honest.test")
        client.starttls(context=ctx)
        client.ehlo("honest.test")
        client.login(*HONEST)
        refused = client.sendmail("alice@example.org", ["friend@remote.test"], MESSAGE)
        assert not refused, refused
    return time.perf_counter() - began


def honest_phase(port: int, messages: int, clients: int, deadline: float) -> dict[str, Any]:
    ctx = tls_context()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    todo = iter(range(messages))

    def worker() -> None:
        for _ in range(messages):  # bounded; `todo` hands out the messages
            with lock:
                if next(todo, None) is None or time.monotonic() > deadline:
                    return
            try:
                took = send_one(port, ctx)
            except (OSError, smtplib.SMTPException, AssertionError) as e:
                with lock:
                    errors[type(e).__name__] += 1
                continue
            with lock:
                latencies.append(took)

    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(worker) for _ in range(clients)]:
            future.result()
    return summary(latencies, errors, messages)


def summary(latencies: list[float], errors: Counter[str], wanted: int) -> dict[str, Any]:
    ms = sorted(x * 1000 for x in latencies)
    if len(ms) < 2:
        return {"messages": len(ms), "errors": dict(errors), "truncated": True}
    return {
        "messages": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(statistics.quantiles(ms, n=100, method="inclusive")[98], 2),
        "max_ms": round(ms[-1], 2),
        "errors": dict(errors),
        "truncated": len(ms) + sum(errors.values()) < wanted,
    }


def median_p99(runs: list[dict[str, Any]]) -> float | None:
    """The median of the phases' p99 latencies; None if a phase measured nothing."""
    values = [run["p99_ms"] for run in runs if "p99_ms" in run]
    return round(statistics.median(values), 2) if values and len(values) == len(runs) else None


def attacker(
    port: int,
    threads: int,
    connect_timeout: float,
    go: Any,
    stop: Any,
    refused: Any,
    results: Any,
    deadline: float,
) -> None:
    """Process target: hammer AUTH from ATTACKER_IP until `stop` is set or `deadline`.

    Outcomes counted: the AUTH reply code ("535" counted, "454" refused), "421" (refused at
    connect, the lock-out), "dropped" (connect() timed out: the kernel ban drops the SYNs; the
    attacker then reconnects at once, as a bot would), or an exception's name."""
    ctx = tls_context()
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def one_try() -> str:
        login = HONEST[0] if secrets.randbelow(2) else "user" + secrets.token_hex(3)
        token = base64.b64encode(f"\0{login}\0{secrets.token_hex(6)}".encode()).decode()
        client: smtplib.SMTP | None = None
        try:
            client = smtplib.SMTP(
                "127.0.0.1", port, timeout=connect_timeout, source_address=(ATTACKER_IP, 0)
            )
            client.sock.settimeout(30)  # type: ignore[union-attr]  # connected: replies may be slow
            client.ehlo("attacker.test")
            client.starttls(context=ctx)
            client.ehlo("attacker.test")
            code, _ = client.docmd("AUTH", "PLAIN " + token)
            return str(code)
        except smtplib.SMTPConnectError as e:
            return str(e.smtp_code)
        except TimeoutError:
            return "dropped" if client is None else "TimeoutError"
        except (OSError, smtplib.SMTPException) as e:
            return type(e).__name__
        finally:
            if client is not None:
                with contextlib.suppress(OSError, smtplib.SMTPException):
                    client.close()

    def loop() -> None:
        for _ in range(10_000_000):  # bounded; stops on `stop` or the deadline long before
            if stop.is_set() or time.monotonic() > deadline:
                return
            if not go.is_set():  # an idle phase: the attacker pauses
                go.wait(0.05)
                continue
            outcome = one_try()
            with lock:
                counts[outcome] += 1
            if outcome in ("454", "421", "dropped"):
                with refused.get_lock():
                    refused.value += 1

    began = time.monotonic()
    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=max(0.0, deadline - time.monotonic()) + 30)
    results.put({"replies": dict(counts), "seconds": time.monotonic() - began})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--messages", type=int, default=200, help="honest messages per phase")
    ap.add_argument("--clients", type=int, default=2, help="honest clients in parallel")
    ap.add_argument("--rounds", type=int, default=3, help="idle and attack phases, alternating")
    ap.add_argument("--attackers", type=int, default=8, help="attacker connections in parallel")
    ap.add_argument(
        "--attacker-timeout",
        type=float,
        default=1.0,
        help="seconds the attacker waits for a connection before trying again",
    )
    ap.add_argument("--warmup", type=float, default=60.0,
                    help="at most this many seconds of attack before honest users are measured:"
                         " measuring starts once the attacker is being refused (454, 421) or"
                         " dropped")  # fmt: skip
    ap.add_argument("--max-seconds", type=float, default=240.0, help="bound on the whole run")
    ap.add_argument("--workers", type=int, default=0,
                    help="[server] workers when this tree has it (0: one process)")  # fmt: skip
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                    help="the attacker on its own CPU, the server and the honest clients on "
                         "the other (default): the attacker is remote in real life, and on a "
                         "2-CPU machine its CPU use would otherwise be measured too")  # fmt: skip
    ap.add_argument(
        "--ban",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the kernel ban (default); --no-ban sets auth_ban_after = 0, to compare",
    )
    ap.add_argument("--log", type=Path, help="keep the server's log in this file")
    args = ap.parse_args()
    pin = args.pin and len(os.sched_getaffinity(0)) >= 2
    cpus = sorted(os.sched_getaffinity(0))
    deadline = time.monotonic() + args.max_seconds

    # The breaker would suspend the honest login after 1,000 recipients in an hour: one
    # benchmark user sends more than that.
    overrides: dict[str, dict[str, Any]] = {"ratelimits": {"breaker_recipients_per_hour": 0}}
    if not args.ban:
        overrides["ratelimits"]["auth_ban_after"] = 0
    if any(f.name == "server" for f in dataclasses.fields(config.Config)):
        overrides["server"] = {"workers": args.workers}
    with tempfile.TemporaryDirectory(prefix="mailgate-bench-auth-") as tmp:
        gw = Gateway(Path(tmp) / "gw", overrides)
        gw.add_user(*HONEST)
        gw.start("--no-delivery")
        if pin:
            assert gw.proc is not None
            for pid in gw.pids():
                os.sched_setaffinity(pid, {cpus[0]})
            os.sched_setaffinity(0, {cpus[0]})
        try:
            port = gw.ports["submission"]
            send_one(port, tls_context())  # warm up: first login, TLS, caches

            ctx = multiprocessing.get_context("fork")
            go, stop, refused, results = ctx.Event(), ctx.Event(), ctx.Value("i", 0), ctx.Queue()
            hammer_args = (
                port, args.attackers, args.attacker_timeout, go, stop, refused, results, deadline
            )  # fmt: skip
            proc = ctx.Process(target=attacker, args=hammer_args)
            proc.start()
            if pin and proc.pid is not None:
                os.sched_setaffinity(proc.pid, set(cpus[1:]))
            # The first failures are answered slowly (auth_base_delay doubling): the hammering
            # steady state is the one where every attempt is refused or dropped at once.
            go.set()
            warm_until = min(time.monotonic() + args.warmup, deadline)
            while time.monotonic() < warm_until and refused.value < 10 * args.attackers:
                time.sleep(0.1)
            # Idle and attack phases alternate, so that drift in a noisy machine hits both.
            idle_runs, attack_runs, rates = [], [], []
            for _ in range(args.rounds):
                go.clear()
                time.sleep(args.attacker_timeout + 0.1)  # attempts in flight end first
                idle_runs.append(honest_phase(port, args.messages, args.clients, deadline))
                go.set()
                refused_before, began = refused.value, time.monotonic()
                attack_runs.append(honest_phase(port, args.messages, args.clients, deadline))
                rates.append((refused.value - refused_before) / (time.monotonic() - began))
            stop.set()
            try:
                hammer = results.get(timeout=max(1.0, deadline - time.monotonic()) + 30)
            except Exception:  # the queue's Empty: the attacker did not report
                hammer = {"replies": {}, "seconds": 0.0, "lost": True}
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
            bans = gw.log_text().count("client banned in the kernel")
        finally:
            if args.log is not None:
                args.log.write_text(gw.log_text())
            gw.stop()

    attempts = sum(hammer["replies"].values())
    idle, attack = median_p99(idle_runs), median_p99(attack_runs)
    ratio = attack / idle if idle and attack else None
    print(json.dumps({
        "honest_ip": HONEST_IP,
        "attacker_ip": ATTACKER_IP,
        "workers": overrides.get("server", {}).get("workers", "n/a"),
        "pinned": pin,
        "kernel_ban": args.ban,
        "rounds": args.rounds,
        "idle": idle_runs,
        "attack": attack_runs,
        "idle_p99_ms_median": idle,
        "attack_p99_ms_median": attack,
        "attacker": {
            "threads": args.attackers,
            "attempts": attempts,
            "per_second": round(attempts / hammer["seconds"], 1) if hammer["seconds"] else 0,
            "replies": hammer["replies"],
            # while the honest users were measured (the warm-up has slow, delayed answers)
            "refused_or_dropped_per_second_measured": [round(r, 1) for r in rates],
            "kernel_bans_logged": bans,
        },
        "p99_ratio": round(ratio, 2) if ratio is not None else None,
        # An attack that made no attempts measured nothing: never report it as a pass.
        "within_2x": ratio is not None and ratio <= 2.0 and attempts > 0,
    }, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

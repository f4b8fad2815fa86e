"""The shared counters' cost per message: Redis commands and client CPU (issues #13, #19).

Owns: nothing the server uses. Plays what a submission session asks of `limits.counters` for
one message on one connection (admitted at connect with the AUTH lock-out check, an AUTH
attempt begun and ended, every RCPT and DATA checked, the message recorded, the connection
taken back) from N concurrent sessions of one login and one client address, on uvloop as the
server runs, against a Redis of its own on a free port (started and stopped by its PID, so that
`INFO commandstats` counts this run's commands alone):

    python bench/bench_counters.py --messages 3000 --sessions 20 --rounds 3

Prints one JSON object: per round, this process's CPU per message (the counters' client
side: encoding, the socket, parsing, the rules), Redis's own CPU per message, the commands sent
to Redis per message (each a round trip's worth of work for both sides, whether or not a
session waits for its answer) and the commands Redis ran per message (those the scripts call
included), with medians. It uses whichever of the counters' calls the code under test has, so
the same file measures an older tree (`PYTHONPATH=/path/to/old/src python
bench/bench_counters.py`): before issue #19's change, the connection count and the lock-out
were two calls (`open_connection`, `is_client_refused`) and every check asked Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import time
from typing import Any, cast

import redis
import uvloop
from procstat import cpu_seconds

import mailgate
from mailgate.config import RateLimitsConfig
from mailgate.limits import AuthGuard, Limits
from mailgate.limits.counters import Counters
from mailgate.limits.shared import SharedState

IP = "192.0.2.7"
LOGIN = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def one_message(counters: Counters, rcpts: int) -> None:
    """What receive/serve.py and receive/session.py ask for one message on one connection."""
    if hasattr(counters, "admit"):
        admission, locked_out = await counters.admit(IP, 20000, lockout=True)
    else:  # before issue #19: two calls
        admission = await counters.open_connection(IP, 20000)
        locked_out = await counters.is_client_refused(IP)
    assert admission == "shared" and not locked_out, (admission, locked_out)
    decision = await counters.begin_attempt(IP, LOGIN)
    assert not decision.is_refused, decision
    await counters.end_attempt(IP, LOGIN, decision, succeeded=True, verified=True)
    now = getattr(counters, "decides_now", None)
    for n in range(1, rcpts + 1):
        if now is not None and now("submission", LOGIN, IP):
            counters.check_recipient_now(service="submission", login=LOGIN, ip=IP,
                                         rcpt_in_message=n)  # fmt: skip
        else:
            await counters.check_recipient(service="submission", login=LOGIN, ip=IP,
                                           rcpt_in_message=n)  # fmt: skip
    if now is not None and now("submission", LOGIN, IP):
        counters.check_message_now(service="submission", login=LOGIN, ip=IP, nrcpt=rcpts)
    else:
        await counters.check_message(service="submission", login=LOGIN, ip=IP, nrcpt=rcpts)
    await counters.record_message(service="submission", login=LOGIN, ip=IP, nrcpt=rcpts)
    if hasattr(counters, "close_connection_soon"):
        counters.close_connection_soon(IP)
    else:  # before: receive/serve.py made a task per close
        await counters.close_connection(IP)


async def round_(url: str, prefix: str, messages: int, sessions: int, rcpts: int,
                 redis_pid: int) -> dict[str, float]:  # fmt: skip
    # As bench/mailgate_instance.py: limits on, out of this load's reach, so every rule runs.
    cfg = RateLimitsConfig(
        login_messages_per_hour=10**7, ip_recipients_per_hour=10**7,
        breaker_recipients_per_hour=0, auth_delay_after=10000, auth_refuse_after=10000,
        auth_login_refuse_after=10000, auth_parallel_per_client=1000,
        auth_parallel_per_login=1000,
    )  # fmt: skip
    counters = Counters(Limits(cfg), AuthGuard(cfg), SharedState(url, prefix))
    await one_message(counters, rcpts)  # connected, scripts loaded
    stats = redis.Redis.from_url(url)
    before = _commands(stats)
    left = [messages]

    async def session() -> None:
        while left[0] > 0:
            left[0] -= 1
            await one_message(counters, rcpts)

    cpu, wall, server = time.process_time(), time.perf_counter(), cpu_seconds(redis_pid)
    await asyncio.gather(*(session() for _ in range(sessions)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    server = cpu_seconds(redis_pid) - server
    await counters.close()
    await asyncio.sleep(0.05)
    after = _commands(stats)
    stats.close()
    counts = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    # commandstats counts the commands scripts run too; a client sends only these here (no
    # breaker trip or heartbeat in this load, so no SET, GET or DEL of its own).
    sent = sum(counts.get(k, 0) for k in ("evalsha", "eval", "ping", "hello", "auth", "select"))
    return {
        "cpu_us_per_message": round(cpu / messages * 1e6, 1),
        "redis_server_cpu_us_per_message": round(server / messages * 1e6, 1),
        "messages_per_s": round(messages / wall, 1),
        "commands_sent_per_message": round(sent / messages, 2),
        "script_calls_per_message": round(
            (counts.get("evalsha", 0) + counts.get("eval", 0)) / messages, 2),
        "redis_commands_run_per_message": round(sum(counts.values()) / messages, 2),
    }  # fmt: skip


def _commands(client: redis.Redis) -> dict[str, int]:
    """Calls per command since Redis started, less what this measuring connection sends."""
    info: dict[str, Any] = client.info("commandstats")
    out = {k.removeprefix("cmdstat_"): int(cast(dict[str, Any], v)["calls"])
           for k, v in info.items()}  # fmt: skip
    out.pop("info", None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--rcpts", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    port = free_port()
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen([server, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        for _ in range(100):  # bounded: redis-server answers within a second or two
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        rounds = [
            uvloop.run(round_(url, f"bench{i}:", a.messages, a.sessions, a.rcpts, proc.pid))
            for i in range(a.rounds)
        ]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(json.dumps({
        "bench": "counters", "code": mailgate.__file__, "messages": a.messages,
        "sessions": a.sessions, "rcpts": a.rcpts, "rounds": rounds,
        "cpu_us_per_message_median": statistics.median(r["cpu_us_per_message"] for r in rounds),
        "redis_server_cpu_us_per_message_median": statistics.median(
            r["redis_server_cpu_us_per_message"] for r in rounds),
        "commands_sent_per_message_median": statistics.median(
            r["commands_sent_per_message"] for r in rounds),
    }))  # fmt: skip


if __name__ == "__main__":
    main()

"""`mailgate trace` on a day of a large institution's traffic (issue #16).

Owns: nothing the server uses. Writes one day file of the trace log (tracelog/store.py) with
`--messages` messages (default 2 000 000), the events the server records for each (accepted,
one outcome per recipient, a deferral for 5 %, a bounce and its DSN for 1 %, removed), through
the same `store.append()` the server's writer uses, in batches like the writer's; then looks
messages up by queue id, Message-ID, sender, recipient and login with `tracelog.query.find()`
(what `mailgate trace` runs) and times `mailgate trace` as a command, and `status`' summary.

    python bench/bench_trace.py --dir /var/lib/mailgate-bench [--messages 2000000] [--keep]

Prints one JSON object: write rate, file size, and per kind of query the median and 95th
percentile in milliseconds over --queries random look-ups.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mailgate.spool.ids import new_queue_id
from mailgate.tracelog import query, store

BATCH = 5_000  # events per transaction, about what the writer appends per half second at peak


def message_events(at: float, rng: random.Random, logins: list[str]) -> list[store.Event]:
    """What the server records for one message: accepted, one outcome per recipient (5 %
    deferred first), for 1 % a bounce with its DSN, removed."""
    qid = new_queue_id()
    login = rng.choice(logins)
    sender = f"{login}@example.ac.uk"
    rcpts = [f"r{rng.randrange(1_000_000)}@dest{rng.randrange(5000)}.example"
             for _ in range(1 if rng.random() < 0.7 else 2)]  # fmt: skip
    msgid = f"<{qid}.{rng.getrandbits(48):x}@client.example.ac.uk>"
    client = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    keys = tuple(store.normalise(k) for k in (qid, msgid, sender, *rcpts, login))
    accepted = {"sid": f"{rng.getrandbits(40):010X}", "service": "submission",
                "client": client, "login": login, "mail_from": sender, "to": rcpts,
                "size": rng.randrange(2_000, 200_000), "message_id": msgid}  # fmt: skip
    events = [store.Event(at, qid, "accepted", keys, accepted)]
    for r in rcpts:
        relay = "mx.dest.example[192.0.2.1]:25"
        if rng.random() < 0.05:
            deferred = {"to": r, "relay": relay, "tls": True, "delay": 1.0,
                        "reply": "451 4.7.1 Greylisted, try again later"}  # fmt: skip
            events.append(store.Event(at + 1, qid, "deferred", (), deferred))
        bounced = rng.random() < 0.01
        reply = "550 5.1.1 No such user" if bounced else "250 2.0.0 Ok: queued as X"
        outcome = {"to": r, "relay": relay, "tls": True, "delay": 2.0, "reply": reply}
        events.append(store.Event(at + 2, qid, "bounced" if bounced else "delivered", (),
                                  outcome))  # fmt: skip
        if bounced:
            dsn = new_queue_id()
            report: dict[str, object] = {"action": "failed", "dsn_qid": dsn, "to": sender}
            events.append(store.Event(at + 2, qid, "dsn", (), report))
            queued: dict[str, object] = {"service": "bounce", "mail_from": "", "to": [sender],
                                         "about": qid}  # fmt: skip
            events.append(store.Event(at + 2, dsn, "queued", (dsn, sender, qid), queued))
    events.append(store.Event(at + 3, qid, "removed", (), {}))
    return events


LOGINS = [f"user{i:05d}" for i in range(20_000)]


def generate(folder: Path, messages: int, hours: float,
             rng: random.Random) -> dict[str, object]:  # fmt: skip
    """`messages` spread evenly over the `hours` before now, in today's file."""
    start = time.time() - hours * 3600
    path = store.day_path(folder, store.day_of(time.time()))
    conn = store.connect(path, write=True)
    conn.execute("PRAGMA cache_size=-262144")  # 256 MiB, to build the day faster
    sample: dict[str, list[str]] = {"qid": [], "message_id": [], "sender": [], "recipient": [],
                                    "login": []}  # fmt: skip
    batch: list[store.Event] = []
    events = 0
    started = time.perf_counter()
    for i in range(messages):
        made = message_events(start + i * (hours * 3600 / messages), rng, LOGINS)
        batch += made
        if i % 997 == 0:
            first = made[0]
            data = first.data
            to = data["to"]
            assert isinstance(to, list)
            for kind, value in (("qid", first.qid), ("message_id", data["message_id"]),
                                ("sender", data["mail_from"]), ("recipient", to[0]),
                                ("login", data["login"])):  # fmt: skip
                sample[kind].append(str(value))
        if len(batch) >= BATCH:
            store.append(conn, batch)
            events += len(batch)
            batch = []
    if batch:
        store.append(conn, batch)
        events += len(batch)
    elapsed = time.perf_counter() - started
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    size = sum(p.stat().st_size for p in folder.iterdir())
    return {"messages": messages, "events": events, "seconds": round(elapsed, 1),
            "events_per_second": round(events / elapsed),
            "messages_per_second": round(messages / elapsed), "bytes": size,
            "bytes_per_message": round(size / messages), "sample": sample}  # fmt: skip


def late_append(folder: Path, messages: int, rng: random.Random) -> dict[str, object]:
    """The server's writer at the end of the day: a fresh connection with SQLite's default
    cache (as tracelog.Writer opens it), batches of BATCH events into the full day file."""
    conn = store.connect(store.day_path(folder, store.day_of(time.time())), write=True)
    batches: list[list[store.Event]] = [[]]
    for _ in range(messages):
        batches[-1] += message_events(time.time(), rng, LOGINS)
        if len(batches[-1]) >= BATCH:
            batches.append([])
    events = sum(len(b) for b in batches)
    started = time.perf_counter()
    for batch in batches:
        if batch:
            store.append(conn, batch)
    elapsed = time.perf_counter() - started
    conn.close()
    return {"messages": messages, "events": events, "seconds": round(elapsed, 2),
            "messages_per_second": round(messages / elapsed)}  # fmt: skip


def time_queries(folder: Path, sample: dict[str, list[str]], queries: int,
                 rng: random.Random) -> dict[str, dict[str, float]]:  # fmt: skip
    out: dict[str, dict[str, float]] = {}
    for kind, values in sample.items():
        times: list[float] = []
        found: list[int] = []
        for value in rng.sample(values, min(queries, len(values))):
            started = time.perf_counter()
            traces = query.find(folder, value)
            times.append((time.perf_counter() - started) * 1000)
            found.append(len(traces))
            assert traces, (kind, value)
        times.sort()
        out[kind] = {"median_ms": round(statistics.median(times), 2),
                     "p95_ms": round(times[int(len(times) * 0.95) - 1], 2),
                     "max_ms": round(times[-1], 2), "queries": len(times),
                     "messages_found_median": statistics.median(found)}  # fmt: skip
    return out


def time_command(folder: Path, value: str) -> float:
    """`mailgate trace` as an operator runs it: a new Python process, one query."""
    config = folder.parent / "mailgate.toml"
    config.write_text(f'hostname = "mail.example.ac.uk"\n[trace]\npath = "{folder}"\n')
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mailgate", "-c", str(config), "trace", value],
                   check=True, capture_output=True)  # fmt: skip
    return round((time.perf_counter() - started) * 1000, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a temp dir)"
    )
    parser.add_argument("--messages", type=int, default=2_000_000)
    parser.add_argument("--hours", type=float, default=12.0,
                        help="the messages are spread over this many hours before now")  # fmt: skip
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--keep", action="store_true", help="keep the generated log")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-trace-"))
    folder = root / "trace"
    rng = random.Random(16)
    try:
        written = generate(folder, args.messages, args.hours, rng)
        sample = written.pop("sample")
        assert isinstance(sample, dict)
        result: dict[str, object] = {"write": written}
        result["late_append"] = late_append(folder, 20_000, rng)
        result["find"] = time_queries(folder, sample, args.queries, rng)
        result["command_ms"] = {kind: time_command(folder, values[0])
                                for kind, values in sample.items()}  # fmt: skip
        started = time.perf_counter()
        summary = query.summarise(folder, time.time() - 3600)
        result["status_last_hour_ms"] = round((time.perf_counter() - started) * 1000, 1)
        result["status_last_hour_accepted"] = summary.counts["accepted"]
        print(json.dumps(result, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(root)


if __name__ == "__main__":
    main()

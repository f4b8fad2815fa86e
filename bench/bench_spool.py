"""Spool commit throughput: one committer at a time vs group commit with concurrent sessions.

Owns: nothing the server uses. Run it on the file system that will hold the spool, because
fsync costs are the whole point (on tmpfs both figures are meaningless):

    python bench/bench_spool.py --dir /var/spool/mailgate-bench --count 400 --rounds 5

The spool is the journal (spool/journal.py); the one-file-per-entry layout that earlier runs
compared it with is no longer written (figures in PERFORMANCE.md). Prints one JSON object:
commits per second for sequential `commit()` calls and for
`GroupCommitter.commit()` from N concurrent asyncio sessions (medians over alternating rounds,
and each round's figure), with the mean batch size and the process CPU per commit (the event
loop and the committer together: what a hand-off costs shows here, not in the rate, when
batches are small); and, with --lifecycle, the rate of the engine's side (load, read_message,
one update, remove per entry) over the committed entries. `--sessions 1,2,20` measures each
count; `--uvloop` runs the sessions on uvloop as the server does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from mailgate.spool.api import SpoolStore
from mailgate.spool.entry import Envelope, Recipient
from mailgate.spool.group import GroupCommitter
from mailgate.spool.journal import JournalStore

BACKENDS: dict[str, type[JournalStore]] = {"journal": JournalStore}

PREFIX = b"Received: from client.test by mail.example.ac.uk with ESMTPSA\r\n"


def message(size: int) -> bytes:
    head = b"From: alice@example.ac.uk\r\nTo: bob@example.org\r\nSubject: bench\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    return head + line * max(0, (size - len(head)) // len(line))


def envelope(qid: str) -> Envelope:
    return Envelope(id=qid, mail_from="alice@example.ac.uk", recipients=(Recipient("b@x.org"),))


def sequential(store: SpoolStore, count: int, body: bytes) -> float:
    start = time.perf_counter()
    for _ in range(count):
        incoming = store.begin()
        incoming.write(body)
        store.commit(incoming, envelope(incoming.qid), PREFIX)
    return count / (time.perf_counter() - start)


def grouped(
    store: SpoolStore, count: int, body: bytes, sessions: int, use_uvloop: bool
) -> tuple[float, int, float]:
    """Commits per second, batches written, CPU ms of this process per commit."""
    committer = GroupCommitter(store)

    async def session(n: int) -> None:
        for _ in range(n):
            incoming = store.begin()
            incoming.write(body)
            await committer.commit(incoming, envelope(incoming.qid), PREFIX)

    async def run() -> None:
        share, extra = divmod(count, sessions)
        await asyncio.gather(*(session(share + (i < extra)) for i in range(sessions)))

    cpu, start = time.process_time(), time.perf_counter()
    if use_uvloop:
        import uvloop

        uvloop.run(run())
    else:
        asyncio.run(run())
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return count / elapsed, committer.batches, 1000 * cpu / count


def lifecycle(store: SpoolStore) -> float:
    """Entries per second through the engine's calls: load, read, record a try, remove."""
    ids = store.ids()
    start = time.perf_counter()
    for qid in ids:
        env = store.load(qid)
        store.read_message(qid)
        store.update(qid, lambda e: e.with_recipient(replace(e.recipients[0], attempts=1)))
        store.remove(env.id)
    return len(ids) / (time.perf_counter() - start)


def run_rounds(args: argparse.Namespace, formats: list[str], body: bytes) -> dict[str, object]:
    counts = [int(n) for n in str(args.sessions).split(",")]
    seq: dict[str, list[float]] = {f: [] for f in formats}
    grp: dict[tuple[str, int], list[tuple[float, int, float]]] = {
        (f, n): [] for f in formats for n in counts
    }
    life: dict[str, list[float]] = {f: [] for f in formats}
    # Alternate modes and formats so that a disk shared with other work slows all alike.
    for _ in range(args.rounds):
        for fmt in formats:
            kind = BACKENDS[fmt]
            scratch = Path(tempfile.mkdtemp(prefix="bench-spool-", dir=args.dir))
            try:
                seq[fmt].append(sequential(kind(scratch / "seq"), args.count, body))
                for n in counts:
                    store = kind(scratch / f"grp{n}")
                    grp[fmt, n].append(grouped(store, args.count, body, n, args.uvloop))
                if args.lifecycle:
                    life[fmt].append(lifecycle(store))
            finally:
                shutil.rmtree(scratch)
    results: dict[str, object] = {}
    for fmt in formats:
        result: dict[str, object] = {
            "format": fmt,
            "loop": "uvloop" if args.uvloop else "asyncio",
            "message_bytes": len(PREFIX) + len(body),
            "commits_per_round": args.count,
            "rounds": args.rounds,
            "sequential_commits_per_s": round(statistics.median(seq[fmt]), 1),
            "sequential_runs": [round(r, 1) for r in seq[fmt]],
        }
        for n in counts:
            runs = grp[fmt, n]
            rate = statistics.median(r[0] for r in runs)
            result[f"grouped_{n}"] = {
                "sessions": n,
                "commits_per_s": round(rate, 1),
                "runs": [round(r[0], 1) for r in runs],
                "mean_batch": round(args.count / statistics.median(r[1] for r in runs), 1),
                "cpu_ms_per_commit": round(statistics.median(r[2] for r in runs), 3),
                "speedup": round(rate / statistics.median(seq[fmt]), 2),
            }
        if args.lifecycle:
            result["lifecycle_entries_per_s"] = round(statistics.median(life[fmt]), 1)
            result["lifecycle_runs"] = [round(r, 1) for r in life[fmt]]
        results[fmt] = result
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("."), help="where to make a scratch spool")
    parser.add_argument("--count", type=int, default=400, help="commits per run")
    parser.add_argument("--sessions", default="20",
                        help="concurrent committers; a comma list measures each")  # fmt: skip
    parser.add_argument("--uvloop", action="store_true", help="run the sessions on uvloop")
    parser.add_argument("--size", type=int, default=10240, help="message size in bytes")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs; medians reported")
    parser.add_argument("--format", choices=sorted(BACKENDS), default="journal",
                        help="spool format (only the journal is left)")  # fmt: skip
    parser.add_argument("--lifecycle", action="store_true",
                        help="also time load, read, update, remove of each entry")  # fmt: skip
    args = parser.parse_args()

    formats = [args.format]
    results = run_rounds(args, formats, message(args.size))
    print(json.dumps(results[formats[0]] if len(formats) == 1 else results, indent=2))


if __name__ == "__main__":
    main()

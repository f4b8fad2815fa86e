"""Spool commit throughput: one committer at a time vs group commit with concurrent sessions.

Owns: nothing the server uses. Run it on the file system that will hold the spool, because
fsync costs are the whole point (on tmpfs both figures are meaningless):

    python bench/bench_spool.py --dir /var/spool/mailgate-bench --count 400 --rounds 5

Prints one JSON object: commits per second for sequential `Store.commit()` calls and for
`GroupCommitter.commit()` from N concurrent asyncio sessions (medians over alternating rounds,
and each round's figure), with the mean batch size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from mailgate.spool.entry import Envelope, Recipient
from mailgate.spool.group import GroupCommitter
from mailgate.spool.store import Store

PREFIX = b"Received: from client.test by mail.example.ac.uk with ESMTPSA\r\n"


def message(size: int) -> bytes:
    head = b"From: alice@example.ac.uk\r\nTo: bob@example.org\r\nSubject: bench\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    return head + line * max(0, (size - len(head)) // len(line))


def envelope(qid: str) -> Envelope:
    return Envelope(id=qid, mail_from="alice@example.ac.uk", recipients=(Recipient("b@x.org"),))


def sequential(store: Store, count: int, body: bytes) -> float:
    start = time.perf_counter()
    for _ in range(count):
        incoming = store.begin()
        incoming.write(body)
        store.commit(incoming, envelope(incoming.qid), PREFIX)
    return count / (time.perf_counter() - start)


def grouped(store: Store, count: int, body: bytes, sessions: int) -> tuple[float, int]:
    committer = GroupCommitter(store)

    async def session(n: int) -> None:
        for _ in range(n):
            incoming = store.begin()
            incoming.write(body)
            await committer.commit(incoming, envelope(incoming.qid), PREFIX)

    async def run() -> None:
        share, extra = divmod(count, sessions)
        await asyncio.gather(*(session(share + (i < extra)) for i in range(sessions)))

    start = time.perf_counter()
    asyncio.run(run())
    return count / (time.perf_counter() - start), committer.batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("."), help="where to make a scratch spool")
    parser.add_argument("--count", type=int, default=400, help="commits per run")
    parser.add_argument("--sessions", type=int, default=20, help="concurrent committers")
    parser.add_argument("--size", type=int, default=10240, help="message size in bytes")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs; medians reported")
    args = parser.parse_args()

    body = message(args.size)
    seq: list[float] = []
    grp: list[float] = []
    batches = 0
    # Alternate the two modes so that a disk shared with other work slows both alike.
    for _ in range(args.rounds):
        scratch = Path(tempfile.mkdtemp(prefix="bench-spool-", dir=args.dir))
        try:
            seq.append(sequential(Store(scratch / "seq"), args.count, body))
            rate, batches = grouped(Store(scratch / "grp"), args.count, body, args.sessions)
            grp.append(rate)
        finally:
            shutil.rmtree(scratch)
    result = {
        "message_bytes": len(PREFIX) + len(body),
        "commits_per_round": args.count,
        "rounds": args.rounds,
        "sequential_commits_per_s": round(statistics.median(seq), 1),
        "sequential_runs": [round(r, 1) for r in seq],
        "grouped_sessions": args.sessions,
        "grouped_commits_per_s": round(statistics.median(grp), 1),
        "grouped_runs": [round(r, 1) for r in grp],
        "grouped_mean_batch": round(args.count / batches, 1),
        "speedup": round(statistics.median(grp) / statistics.median(seq), 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

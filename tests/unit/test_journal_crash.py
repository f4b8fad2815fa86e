"""kill -9 of a process that commits, updates and removes in a loop on a journal spool: every
operation it reported as done survives recovery, and nothing half-written becomes an entry."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mailgate.spool.journal import JournalStore

# The child: random batches (some messages spilled to tmp/ and copied in the kernel), updates
# and removals, on small segments so that rotation and compaction happen too. It prints one
# line per operation after the call returned: "C qid size", "U qid attempts", "R qid".
CHILD = r"""
import random, sys
from pathlib import Path
from mailgate.spool.entry import Envelope, Recipient
from mailgate.spool.journal import JournalStore
from mailgate.spool.incoming import MEMORY_LIMIT

def body(qid, lines):
    return (qid.encode() + b"\r\n") * lines

spool, seed = Path(sys.argv[1]), int(sys.argv[2])
rng = random.Random(seed)
store = JournalStore(spool, segment_size=256 * 1024)
live = store.ids()
for _ in range(1_000_000):
    roll = rng.random()
    if (roll < 0.4 and len(live) < 40) or len(live) < 3:
        items = []
        for _ in range(rng.randint(1, 5)):
            incoming = store.begin()
            lines = rng.choice([2, 300, 300, 300, MEMORY_LIMIT // 16 + 5])
            incoming.write(body(incoming.qid, lines))
            env = Envelope(id=incoming.qid, mail_from="a@example.org",
                           recipients=(Recipient("b@example.net"),))
            items.append((incoming, env, b""))
        done = store.commit_batch(items)
        print("\n".join(f"C {e.id} {e.size}" for e in done), flush=True)
        live.extend(e.id for e in done)
    elif roll < 0.8:
        qid = rng.choice(live)
        env = store.update(qid, lambda e: e.with_recipient(
            e.recipients[0].__class__(e.recipients[0].address,
                                      attempts=e.recipients[0].attempts + 1)))
        print(f"U {qid} {env.recipients[0].attempts}", flush=True)
    else:
        qid = live.pop(rng.randrange(len(live)))
        store.remove(qid)
        print(f"R {qid}", flush=True)
"""

ROUNDS = 4
OPERATIONS_BEFORE_KILL = 300
ROUND_TIMEOUT = 20.0


# The same through the server's path: 20 asyncio sessions commit through GroupCommitter (its
# committer thread) and print "C qid size" once commit() returned, i.e. when the 250 would be
# sent.
GROUP_CHILD = r"""
import asyncio, random, sys
from pathlib import Path
from mailgate.spool.entry import Envelope, Recipient
from mailgate.spool.group import GroupCommitter
from mailgate.spool.journal import JournalStore
from mailgate.spool.incoming import MEMORY_LIMIT

spool, seed = Path(sys.argv[1]), int(sys.argv[2])
store = JournalStore(spool, segment_size=256 * 1024)
committer = GroupCommitter(store)

async def session(n):
    rng = random.Random(seed * 100 + n)
    for _ in range(100_000):
        incoming = store.begin()
        lines = rng.choice([2, 300, 300, MEMORY_LIMIT // 16 + 5])
        incoming.write((incoming.qid.encode() + b"\r\n") * lines)
        env = Envelope(id=incoming.qid, mail_from="a@example.org",
                       recipients=(Recipient("b@example.net"),))
        stored = await committer.commit(incoming, env)
        print(f"C {stored.id} {stored.size}", flush=True)

async def main():
    await asyncio.gather(*(session(n) for n in range(20)))

asyncio.run(main())
"""


def run_and_kill(spool: Path, seed: int, child_code: str = CHILD) -> list[str]:
    """Start the child, let it report some operations, kill -9 it; return its whole lines."""
    child = subprocess.Popen(
        [sys.executable, "-c", child_code, str(spool), str(seed)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert child.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + ROUND_TIMEOUT
    try:
        while len(lines) < OPERATIONS_BEFORE_KILL and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            lines.append(line.decode())
    finally:
        os.kill(child.pid, signal.SIGKILL)
        rest = child.stdout.read().decode()  # what it printed before it died
        child.wait(10)
    assert child.returncode == -signal.SIGKILL, "the child ended on its own: see its stderr"
    lines.extend(rest.splitlines(keepends=True))
    return [line.strip() for line in lines if line.endswith("\n") and line.strip()]


def test_kill_9_loses_no_acknowledged_operation(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    committed: dict[str, int] = {}  # qid -> size, as reported
    attempts: dict[str, int] = {}
    removed: set[str] = set()
    for seed in range(ROUNDS):
        for line in run_and_kill(spool, seed):
            op, qid, *rest = line.split()
            if op == "C":
                committed[qid] = int(rest[0])
            elif op == "U":
                attempts[qid] = int(rest[0])
            else:
                removed.add(qid)
        store = JournalStore(spool)
        store.recover()
        present = set(store.ids())
        for qid, size in committed.items():
            if qid in removed:
                assert qid not in present, f"removal of {qid} was reported but undone"
                continue
            assert qid in present, f"acknowledged {qid} lost"
            envelope = store.load(qid)
            assert envelope.size == size
            # The child's update in flight may have landed without being reported: +1 at most.
            reported = attempts.get(qid, 0)
            assert reported <= envelope.recipients[0].attempts <= reported + 1
        for qid in present:  # reported or not: only whole messages
            message = store.read_message(qid)
            unit = qid.encode() + b"\r\n"
            assert message == unit * (len(message) // len(unit)), qid
            assert store.load(qid).size == len(message)
        # The child's own view carries on from here in the next round (operations in flight
        # at the kill may or may not have landed; both are fine).
        committed.update({q: store.load(q).size for q in present if q not in committed})
        attempts.update({q: store.load(q).recipients[0].attempts for q in present})
        removed.update(q for q in committed if q not in present)
        store.close()
    assert len(committed) > ROUNDS * 50


def test_kill_9_during_group_commits_loses_no_acknowledged_message(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    committed: dict[str, int] = {}
    for seed in range(ROUNDS):
        for line in run_and_kill(spool, seed, GROUP_CHILD):
            op, qid, reported = line.split()
            assert op == "C"
            committed[qid] = int(reported)
        store = JournalStore(spool)
        store.recover()
        present = set(store.ids())
        for qid, length in committed.items():
            assert qid in present, f"acknowledged {qid} lost"
            assert store.load(qid).size == length
        for qid in present:  # reported or not: only whole messages
            message = store.read_message(qid)
            unit = qid.encode() + b"\r\n"
            assert message == unit * (len(message) // len(unit)), qid
        store.close()
    assert len(committed) > ROUNDS * 50

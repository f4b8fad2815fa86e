"""Group commit: concurrent asyncio sessions share batches; results stay per entry.

Every test runs against the journal, through the SpoolStore interface only."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailgate.errors import SpoolFull
from mailgate.spool import group
from mailgate.spool.entry import Envelope, Recipient
from mailgate.spool.group import GroupCommitter
from mailgate.spool.incoming import MEMORY_LIMIT, Incoming
from mailgate.spool.journal import JournalStore
from tests.support.waiting import wait_for

PREFIX = b"Received: by mail.example.ac.uk\r\n"


def envelope(qid: str) -> Envelope:
    return Envelope(
        id=qid,
        mail_from="alice@example.ac.uk",
        recipients=(Recipient("bob@example.org"),),
        received_at=datetime(2026, 3, 1, 12, 0, tzinfo=UTC),
    )


def body(n: int) -> bytes:
    return f"Subject: message {n}\r\n\r\n".encode() + b"x" * 10240 + b"\r\n"


class Gate:
    """Holds the first batch until the test opens the gate, to control what arrives meanwhile."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.in_first_batch = threading.Event()
        self.open_gate = threading.Event()

    def enter(self, items: Sequence[tuple[Incoming, Envelope, bytes]]) -> None:
        self.batch_sizes.append(len(items))
        if len(self.batch_sizes) == 1:
            self.in_first_batch.set()
            assert self.open_gate.wait(5)


class GatedJournalStore(JournalStore):
    """A real JournalStore whose first batch waits for the test."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = Gate()

    def commit_batch(
        self, items: Sequence[tuple[Incoming, Envelope, bytes]]
    ) -> list[Envelope | Exception]:
        self.gate.enter(items)
        return super().commit_batch(items)


def leftovers(store: JournalStore) -> list[str]:
    """Entries still there, as a fresh instance reads them back from disk."""
    return [f"entry {q}" for q in JournalStore(store.path).ids()]


def disk_full(fd: int, data: bytes) -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


async def in_thread(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 5)


def test_fifty_concurrent_commits_all_land_in_few_batches(tmp_path: Path) -> None:
    store = JournalStore(tmp_path / "spool")
    committer = GroupCommitter(store)

    async def session(n: int) -> Envelope:
        incoming = store.begin()
        incoming.write(body(n))
        return await committer.commit(incoming, envelope(incoming.qid), PREFIX)

    async def main() -> list[Envelope]:
        return await asyncio.gather(*(session(n) for n in range(50)))

    stored = asyncio.run(main())
    assert len({e.id for e in stored}) == 50
    assert store.ids() == sorted(e.id for e in stored)
    for n, e in enumerate(stored):
        assert store.read_message(e.id) == PREFIX + body(n)
        assert store.load(e.id) == e
        assert e.size == len(PREFIX) + len(body(n))
    assert committer.batches <= 2  # grouped, not one fsync round per message
    assert os.listdir(store.tmp_dir) == []


def test_commits_arriving_during_a_batch_form_the_next_one(tmp_path: Path) -> None:
    store = GatedJournalStore(tmp_path / "spool")
    committer = GroupCommitter(store)

    async def commit(n: int) -> Envelope:
        incoming = store.begin()
        incoming.write(body(n))
        return await committer.commit(incoming, envelope(incoming.qid))

    async def main() -> list[Envelope]:
        first = asyncio.create_task(commit(0))
        await in_thread(store.gate.in_first_batch)  # the loop is free while batch 1 is written
        later = [asyncio.create_task(commit(n)) for n in (1, 2, 3)]
        await asyncio.sleep(0)  # let them queue (a scheduling step, not a timed wait)
        store.gate.open_gate.set()
        return [await first] + [await t for t in later]

    stored = asyncio.run(main())
    assert store.gate.batch_sizes == [1, 3]
    assert store.ids() == sorted(e.id for e in stored)


def test_one_full_entry_does_not_fail_the_rest_of_its_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = JournalStore(tmp_path / "spool")
    committer = GroupCommitter(store)
    real_write = os.write

    async def main() -> list[Envelope | BaseException]:
        good = [store.begin() for _ in range(3)]
        for n, incoming in enumerate(good):
            incoming.write(body(n))
        full = store.begin()
        full.write(b"a" * MEMORY_LIMIT)
        monkeypatch.setattr(os, "write", disk_full)
        with pytest.raises(SpoolFull):
            full.write(b"b")  # spills: the disk is full for this one
        monkeypatch.setattr(os, "write", real_write)
        order = [good[0], full, good[1], good[2]]
        return await asyncio.gather(
            *(committer.commit(i, envelope(i.qid)) for i in order), return_exceptions=True
        )

    results = asyncio.run(main())
    assert [type(r) for r in results] == [Envelope, SpoolFull, Envelope, Envelope]
    assert store.ids() == sorted(r.id for r in results if isinstance(r, Envelope))
    assert committer.batches == 1
    assert os.listdir(store.tmp_dir) == []


def test_a_cancelled_commit_is_removed_again(tmp_path: Path) -> None:
    store = GatedJournalStore(tmp_path / "spool")
    committer = GroupCommitter(store)

    async def main() -> tuple[bool, str]:
        incoming = store.begin()
        incoming.write(body(0))
        task = asyncio.create_task(committer.commit(incoming, envelope(incoming.qid)))
        await in_thread(store.gate.in_first_batch)
        task.cancel()
        incoming.abort()  # the session's cleanup: a no-op now, the worker owns the files
        store.gate.open_gate.set()
        await committer.drain()
        return task.cancelled(), incoming.qid

    cancelled, qid = asyncio.run(main())
    assert cancelled
    # No 250 was sent, so the sender still owns the message: nothing may stay in the spool.
    assert store.ids() == []
    assert leftovers(store) == []
    assert os.listdir(store.tmp_dir) == []
    assert qid


def test_commits_of_one_pass_of_the_loop_share_a_batch(tmp_path: Path) -> None:
    store = GatedJournalStore(tmp_path / "spool")
    store.gate.open_gate.set()
    committer = GroupCommitter(store)

    async def commit(n: int) -> Envelope:
        incoming = store.begin()
        incoming.write(body(n))
        return await committer.commit(incoming, envelope(incoming.qid))

    async def main() -> list[Envelope]:
        return list(await asyncio.gather(commit(0), commit(1), commit(2)))

    stored = asyncio.run(main())
    # The thread is woken after the loop ran what was ready, not by the first commit alone.
    assert store.gate.batch_sizes == [3]
    assert store.ids() == sorted(e.id for e in stored)


def test_the_idle_thread_ends_and_the_next_commit_starts_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(group, "IDLE_EXIT", 0.05)
    store = JournalStore(tmp_path / "spool")
    committer = GroupCommitter(store)

    async def commit(n: int) -> Envelope:
        incoming = store.begin()
        incoming.write(body(n))
        return await committer.commit(incoming, envelope(incoming.qid))

    def committer_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "spool-group-commit"]

    first = asyncio.run(commit(0))
    wait_for(lambda: not committer_threads(), what="the idle committer thread to end")
    second = asyncio.run(commit(1))  # another event loop, a new thread
    assert store.ids() == sorted([first.id, second.id])
    assert JournalStore(store.path).ids() == store.ids()


def test_a_commit_whose_event_loop_closed_meanwhile_is_removed_again(tmp_path: Path) -> None:
    store = GatedJournalStore(tmp_path / "spool")
    committer = GroupCommitter(store)
    incoming = store.begin()
    incoming.write(body(0))

    async def main() -> None:
        asyncio.create_task(committer.commit(incoming, envelope(incoming.qid)))  # noqa: RUF006
        await in_thread(store.gate.in_first_batch)
        # Returning cancels the task and closes the loop while its batch is being written.

    asyncio.run(main())
    store.gate.open_gate.set()
    asyncio.run(committer.drain())  # settled: written, then removed again
    # Nobody can be told "250" any more: the entry written for it must go again.
    assert store.gate.batch_sizes == [1]
    assert leftovers(store) == []
    assert store.ids() == []
    assert os.listdir(store.tmp_dir) == []

"""The engine's spool thread: the requests of one pass of the event loop share one batch, each
caller gets its own result, order is kept, and a cancelled caller's change still happens.

Every test runs against a real journal in tmp_path."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailgate.deliver import spoolthread
from mailgate.deliver.spoolthread import SpoolThread
from mailgate.spool.api import NotFound
from mailgate.spool.entry import Envelope, Recipient
from mailgate.spool.journal import JournalStore
from tests.support.waiting import wait_for

BODY = b"Subject: hi\r\n\r\nHello\r\n"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JournalStore]:
    s = JournalStore(tmp_path / "spool")
    yield s
    s.close()


def enqueue(store: JournalStore, count: int) -> list[str]:
    out = []
    for _ in range(count):
        env = Envelope(
            id="",
            mail_from="alice@example.ac.uk",
            recipients=(Recipient("bob@example.org"),),
            received_at=datetime(2026, 3, 1, 12, 0, tzinfo=UTC),
        )
        out.append(store.enqueue(env, BODY).id)
    return out


def hold(e: Envelope) -> Envelope:
    return replace(e, held=True)


def test_removals_of_one_pass_of_the_loop_are_one_batch(store: JournalStore) -> None:
    qids = enqueue(store, 50)
    thread = SpoolThread(store)

    async def main() -> None:
        await asyncio.gather(*(thread.remove(q) for q in qids))

    asyncio.run(main())
    assert thread.batches == 1 and thread.changes == 50
    assert store.ids() == [] and JournalStore(store.path).ids() == []


def test_each_caller_gets_its_own_result(store: JournalStore) -> None:
    a, b = enqueue(store, 2)
    thread = SpoolThread(store)

    def broken(e: Envelope) -> Envelope:
        raise ValueError("a bug in a change")

    async def main() -> list[object]:
        return list(
            await asyncio.gather(
                thread.update(a, hold),
                thread.remove("ZZZZZZZZZZZZ"),
                thread.update(b, broken),
                thread.call(lambda: store.read_message(b)),
                return_exceptions=True,
            )
        )

    updated, missing, bug, message = asyncio.run(main())
    assert isinstance(updated, Envelope) and updated.held and updated.id == a
    assert isinstance(missing, NotFound)
    assert isinstance(bug, ValueError)
    assert message == BODY
    assert JournalStore(store.path).load(a).held
    assert not JournalStore(store.path).load(b).held


def test_requests_run_in_the_order_they_were_made(store: JournalStore) -> None:
    [qid] = enqueue(store, 1)
    thread = SpoolThread(store)

    async def main() -> list[object]:
        return list(
            await asyncio.gather(
                thread.call(lambda: store.load(qid)),
                thread.update(qid, hold),
                thread.call(lambda: store.load(qid)),
                thread.remove(qid),
                thread.call(store.ids),
                thread.update(qid, hold),
                return_exceptions=True,
            )
        )

    before, _, after, removed, ids, late = asyncio.run(main())
    assert isinstance(before, Envelope) and not before.held
    assert isinstance(after, Envelope) and after.held
    assert removed is None and ids == []
    assert isinstance(late, NotFound)  # an update after the removal finds nothing
    assert thread.batches == 1


def test_a_cancelled_callers_removal_still_happens(store: JournalStore) -> None:
    [qid] = enqueue(store, 1)
    thread = SpoolThread(store)

    async def main() -> bool:
        task = asyncio.get_running_loop().create_task(thread.remove(qid))
        await asyncio.sleep(0)  # one turn of the loop: the task has queued its removal
        task.cancel()
        await thread.call(lambda: None)  # runs after the removal (order)
        return task.cancelled()

    assert asyncio.run(main())
    assert store.ids() == [] and JournalStore(store.path).ids() == []


def test_the_thread_ends_when_idle_and_the_next_call_starts_another(
    store: JournalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spoolthread, "IDLE_EXIT", 0.01)
    a, b = enqueue(store, 2)
    thread = SpoolThread(store)

    async def main() -> None:
        await thread.remove(a)
        first = thread._thread
        assert first is not None
        await asyncio.to_thread(wait_for, lambda: thread._thread is None, 5)
        await thread.remove(b)
        assert thread._thread is not first

    asyncio.run(main())
    assert thread.batches == 2
    assert store.ids() == []

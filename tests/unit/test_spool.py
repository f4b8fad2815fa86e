"""The spool interface (`SpoolStore`) as plain functions in tmp_path: commit, spilling, batches,
recovery, full disks while receiving, changes, locks. It runs against the journal, the one
implementation; the journal's own format, damage and compaction are in test_journal.py."""

from __future__ import annotations

import errno
import multiprocessing
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailgate.errors import SpoolError, SpoolFull, UsageError
from mailgate.spool.api import NotFound, RecoveryReport
from mailgate.spool.entry import Envelope, Recipient
from mailgate.spool.ids import QUEUE_ID_LENGTH, is_queue_id, new_queue_id
from mailgate.spool.incoming import MEMORY_LIMIT
from mailgate.spool.journal import JournalStore
from tests.support.spool import break_envelope
from tests.support.waiting import wait_for

RECEIVED_AT = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
PREFIX = b"Received: from client.test by mail.example.ac.uk\r\n"
BODY = b"From: alice@example.ac.uk\r\nSubject: hi\r\n\r\nHello\r\n"


def envelope(qid: str = "", *rcpts: str) -> Envelope:
    return Envelope(
        id=qid,
        mail_from="alice@example.ac.uk",
        recipients=tuple(Recipient(a) for a in (rcpts or ("bob@example.org",))),
        received_at=RECEIVED_AT,
        service="submission",
        login="alice",
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def listing(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def commit(store: JournalStore, body: bytes = BODY, prefix: bytes = PREFIX) -> Envelope:
    incoming = store.begin()
    incoming.write(body)
    return store.commit(incoming, envelope(incoming.qid), prefix)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JournalStore]:
    s = JournalStore(tmp_path / "spool")
    yield s
    s.close()


# --- queue ids -------------------------------------------------------------------------


def test_queue_ids_are_fixed_width_sortable_and_unique() -> None:
    made = [new_queue_id() for _ in range(5000)]
    assert all(re.fullmatch(r"[0-9A-Z]{14}", q) for q in made)
    assert QUEUE_ID_LENGTH == 14
    assert len(set(made)) == len(made)
    assert made == sorted(made)  # within one process, later ids sort later


def test_queue_id_time_prefix_follows_the_clock() -> None:
    first = new_queue_id()
    # Ids made later sort later: the time prefix moves on within a second (a millisecond, in fact).
    wait_for(lambda: new_queue_id()[:9] > first[:9], timeout=1, interval=0.001, what="next ms")


@pytest.mark.parametrize("text", ["", "abc123", "../../etc", "A/B", "ABC", "X" * 33, "ÄBCDEFG"])
def test_is_queue_id_rejects_what_cannot_be_a_spool_file_name(text: str) -> None:
    assert not is_queue_id(text)


# --- commit and load --------------------------------------------------------------------


def test_commit_fills_in_an_empty_envelope_id(store: JournalStore) -> None:
    incoming = store.begin()
    incoming.write(BODY)
    stored = store.commit(incoming, envelope(""))
    assert stored.id == incoming.qid
    assert store.load(incoming.qid).id == incoming.qid


def test_commit_refuses_a_foreign_id_and_a_second_commit(store: JournalStore) -> None:
    incoming = store.begin()
    incoming.write(BODY)
    with pytest.raises(UsageError):
        store.commit(incoming, envelope("0000000000OTHER"))
    store.commit(incoming, envelope(incoming.qid))
    with pytest.raises(UsageError):
        store.commit(incoming, envelope(incoming.qid))
    with pytest.raises(UsageError):
        incoming.write(b"more")


def test_abort_after_handing_over_to_a_commit_is_a_no_op(store: JournalStore) -> None:
    incoming = store.begin()
    incoming.write(b"q" * (MEMORY_LIMIT + 1))
    store.prepare_commit(incoming, envelope(incoming.qid))
    assert not incoming.is_open
    incoming.abort()
    with pytest.raises(UsageError):
        incoming.write(b"more")
    with pytest.raises(UsageError):
        store.prepare_commit(incoming, envelope(incoming.qid))
    [stored] = store.commit_batch([(incoming, envelope(incoming.qid), b"")])
    assert isinstance(stored, Envelope)
    assert store.read_message(stored.id) == b"q" * (MEMORY_LIMIT + 1)
    with pytest.raises(UsageError):
        store.commit(incoming, envelope(incoming.qid))


def test_large_message_spills_to_tmp_and_memory_stays_bounded(store: JournalStore) -> None:
    incoming = store.begin()
    chunk = b"0123456789abcde\r\n" * 1024  # 17 KiB
    for _ in range(MEMORY_LIMIT // len(chunk)):
        incoming.write(chunk)
    assert not incoming.is_spilled
    assert listing(store.tmp_dir) == []
    incoming.write(chunk)
    assert incoming.is_spilled
    assert listing(store.tmp_dir) == [f"{incoming.qid}.data"]
    assert mode(incoming.spill_path) == 0o600
    expected = chunk * (MEMORY_LIMIT // len(chunk) + 1)
    assert incoming.getvalue() == expected
    with incoming.open_reader() as reader:
        assert reader.read(len(chunk)) == chunk
    stored = store.commit(incoming, envelope(incoming.qid), PREFIX)
    assert stored.size == len(PREFIX) + len(expected)
    assert store.read_message(stored.id) == PREFIX + expected
    assert listing(store.tmp_dir) == []


@pytest.mark.parametrize("first", [1000, MEMORY_LIMIT + 1])
@pytest.mark.parametrize("second", [500, MEMORY_LIMIT + 2])
def test_replace_discards_what_was_written(store: JournalStore, first: int, second: int) -> None:
    incoming = store.begin()
    incoming.write(b"1" * first)
    incoming.replace(b"2" * second)
    assert incoming.size == second
    assert incoming.is_spilled == (second > MEMORY_LIMIT)
    assert listing(store.tmp_dir) == ([f"{incoming.qid}.data"] if second > MEMORY_LIMIT else [])
    incoming.write(b"3")
    stored = store.commit(incoming, envelope(incoming.qid), PREFIX)
    assert store.read_message(stored.id) == PREFIX + b"2" * second + b"3"
    assert stored.size == len(PREFIX) + second + 1
    assert listing(store.tmp_dir) == []


def test_open_reader_streams_a_message_held_in_memory(store: JournalStore) -> None:
    incoming = store.begin()
    incoming.write(BODY)
    with incoming.open_reader() as reader:
        assert reader.read() == BODY
    incoming.abort()


def test_abort_discards_and_is_idempotent(store: JournalStore) -> None:
    incoming = store.begin()
    incoming.write(b"z" * (MEMORY_LIMIT + 1))
    assert listing(store.tmp_dir) == [f"{incoming.qid}.data"]
    incoming.abort()
    incoming.abort()
    assert listing(store.tmp_dir) == []
    assert store.ids() == []
    with store.begin() as other:
        other.write(b"z" * (MEMORY_LIMIT + 1))
    assert listing(store.tmp_dir) == []


def test_enqueue_allocates_an_id_or_uses_the_given_one(store: JournalStore) -> None:
    stored = store.enqueue(envelope(""), b"bounce\r\n")
    assert is_queue_id(stored.id)
    assert store.read_message(stored.id) == b"bounce\r\n"
    assert stored.size == 8
    qid = new_queue_id()
    assert store.enqueue(envelope(qid), b"dsn\r\n").id == qid
    with pytest.raises(SpoolError, match="already in use"):
        store.enqueue(envelope(qid), b"again\r\n")
    assert store.read_message(qid) == b"dsn\r\n"


def test_load_unknown_invalid_and_corrupt(store: JournalStore) -> None:
    with pytest.raises(NotFound, match=r"^no such queue entry: 0000000000AAAA$"):
        store.load("0000000000AAAA")
    with pytest.raises(NotFound, match=r"^no such queue entry: \.\./\.\./etc/passwd$"):
        store.load("../../etc/passwd")
    with pytest.raises(NotFound):
        store.read_message("0000000000AAAA")
    stored = commit(store)
    break_envelope(store, stored.id, b"{not json")
    with pytest.raises(SpoolError, match="unreadable envelope") as info:
        store.load(stored.id)
    assert not isinstance(info.value, NotFound)


def test_read_headers_stops_at_the_empty_line(store: JournalStore) -> None:
    stored = commit(store)
    assert store.read_headers(stored.id) == PREFIX + b"From: alice@example.ac.uk\r\nSubject: hi\r\n"
    no_body = commit(store, body=b"Subject: x\r\n", prefix=b"")
    assert store.read_headers(no_body.id) == b"Subject: x\r\n"


# --- recovery: each interrupted step of commit() ----------------------------------------


def test_recover_on_a_clean_spool(store: JournalStore) -> None:
    commit(store)
    assert store.recover() == RecoveryReport(entries=1)


# --- a full disk ----------------------------------------------------------------------------


def failing_after(
    real: Callable[..., object], calls: int, err: int, only: Callable[[int], bool] = lambda fd: True
) -> Callable[..., object]:
    """`real`, but raising OSError(err) from the (calls+1)-th call on a matching fd onwards."""
    seen = 0

    def fake(fd: int, *rest: object) -> object:
        nonlocal seen
        if only(fd):
            seen += 1
            if seen > calls:
                raise OSError(err, os.strerror(err))
        return real(fd, *rest)

    return fake


def assert_nothing_left(store: JournalStore) -> None:
    assert JournalStore(store.path).ids() == []  # a fresh instance reads it back from disk
    assert listing(store.tmp_dir) == []
    assert store.ids() == []


@pytest.mark.parametrize("good_writes", [0, 1])
def test_full_disk_while_spilling_frees_the_file_and_fails_the_incoming(
    store: JournalStore, monkeypatch: pytest.MonkeyPatch, good_writes: int
) -> None:
    incoming = store.begin()
    incoming.write(b"a" * MEMORY_LIMIT)
    monkeypatch.setattr(os, "write", failing_after(os.write, good_writes, errno.ENOSPC))
    with pytest.raises(SpoolFull):
        incoming.write(b"b" * 1000)  # spill: write the buffer, then this chunk; one fails
    monkeypatch.undo()
    assert listing(store.tmp_dir) == []
    with pytest.raises(SpoolFull):
        incoming.write(b"c")  # the session may keep reading DATA; the answer stays the same
    with pytest.raises(SpoolFull):
        store.commit(incoming, envelope(incoming.qid))
    assert_nothing_left(store)
    incoming.abort()


def test_one_failed_entry_does_not_fail_its_batch(store: JournalStore) -> None:
    good1, bad, good2 = store.begin(), store.begin(), store.begin()
    for incoming in (good1, bad, good2):
        incoming.write(BODY)
    bad.abort()
    results = store.commit_batch([(i, envelope(i.qid), b"") for i in (good1, bad, good2)])
    assert isinstance(results[0], Envelope)
    assert isinstance(results[1], UsageError)
    assert isinstance(results[2], Envelope)
    assert store.ids() == sorted([good1.qid, good2.qid])


# --- changing entries ---------------------------------------------------------------------


def test_hold_release_flush_and_delete_poke_the_engine(store: JournalStore) -> None:
    stored = commit(store)
    later = datetime.now(UTC) + timedelta(hours=1)
    store.update(
        stored.id,
        lambda e: e.with_recipient(replace(e.recipients[0], next_attempt_at=later, attempts=2)),
    )
    assert store.wakeup_mtime() == 0.0

    marks = [store.wakeup_mtime()]
    assert store.hold(stored.id).held
    assert store.load(stored.id).held
    marks.append(store.wakeup_mtime())
    assert not store.release(stored.id).held
    marks.append(store.wakeup_mtime())
    before = datetime.now(UTC)
    assert store.flush(stored.id) == 1
    marks.append(store.wakeup_mtime())
    flushed = store.load(stored.id).recipients[0]
    assert flushed.next_attempt_at is not None
    assert before <= flushed.next_attempt_at <= datetime.now(UTC)
    assert flushed.attempts == 2
    store.delete(stored.id)
    marks.append(store.wakeup_mtime())
    assert marks == sorted(set(marks))  # every operation moved the mtime forward
    assert mode(store.wakeup_path) == 0o600
    assert_nothing_left(store)


def test_flush_all_touches_only_pending_recipients(store: JournalStore) -> None:
    a, b = commit(store), commit(store)
    delivered_at = datetime(2026, 3, 1, 12, 5, tzinfo=UTC)
    store.update(
        b.id,
        lambda e: replace(
            e,
            recipients=(
                Recipient("x@example.org", state="delivered", next_attempt_at=delivered_at),
                Recipient("y@example.org", next_attempt_at=delivered_at),
            ),
        ),
    )
    assert store.flush() == 2
    assert store.load(a.id).recipients[0].next_attempt_at is not None
    x, y = store.load(b.id).recipients
    assert x.next_attempt_at == delivered_at
    assert y.next_attempt_at is not None and y.next_attempt_at > delivered_at


def test_poke_steps_the_mtime_even_within_one_clock_tick(store: JournalStore) -> None:
    marks = []
    for _ in range(20):
        store.poke()
        marks.append(store.wakeup_mtime())
    assert len(set(marks)) == 20


def test_remove_deletes_env_then_msg_and_missing_is_not_found(store: JournalStore) -> None:
    stored = commit(store)
    store.remove(stored.id)
    assert_nothing_left(store)
    with pytest.raises(NotFound):
        store.remove(stored.id)
    assert store.wakeup_mtime() == 0.0  # the engine's own removals do not wake it


def _blocked_lock_waiters() -> int:
    """Lock requests waiting in the kernel (lines marked '->' in /proc/locks)."""
    with open("/proc/locks") as f:
        return sum(1 for line in f if "->" in line)


@pytest.fixture
def held_update(store: JournalStore) -> Iterator[tuple[Envelope, threading.Event, threading.Event]]:
    """An update of a fresh entry that holds the lock until `release` is set."""
    stored = commit(store)
    inside, release = threading.Event(), threading.Event()

    def slow(e: Envelope) -> Envelope:
        inside.set()
        assert release.wait(5)
        return e.with_recipient(replace(e.recipients[0], attempts=e.recipients[0].attempts + 1))

    t = threading.Thread(target=store.update, args=(stored.id, slow))
    t.start()
    assert inside.wait(5)
    yield stored, inside, release
    release.set()
    t.join(5)


def test_update_waits_for_the_lock_and_then_sees_the_new_file(
    store: JournalStore, held_update: tuple[Envelope, threading.Event, threading.Event]
) -> None:
    stored, _, release = held_update
    base = _blocked_lock_waiters()
    results: list[Envelope] = []

    def bump() -> None:
        results.append(
            store.update(
                stored.id,
                lambda e: e.with_recipient(
                    replace(e.recipients[0], attempts=e.recipients[0].attempts + 10)
                ),
            )
        )

    t = threading.Thread(target=bump)
    t.start()
    wait_for(lambda: _blocked_lock_waiters() > base)  # the second update is blocked in flock
    release.set()
    t.join(5)
    # The waiter locked the old inode, noticed the rename, and re-read the new file.
    assert results[0].recipients[0].attempts == 11
    assert store.load(stored.id).recipients[0].attempts == 11


def test_remove_waits_for_an_update_and_a_waiting_update_then_finds_nothing(
    store: JournalStore, held_update: tuple[Envelope, threading.Event, threading.Event]
) -> None:
    stored, _, release = held_update
    base = _blocked_lock_waiters()
    errors: list[BaseException] = []

    def remove() -> None:
        store.remove(stored.id)

    def late_update() -> None:
        try:
            store.update(stored.id, lambda e: e)
        except NotFound as e:
            errors.append(e)

    remover = threading.Thread(target=remove)
    remover.start()
    wait_for(lambda: _blocked_lock_waiters() > base)
    release.set()
    remover.join(5)
    late = threading.Thread(target=late_update)
    late.start()
    late.join(5)
    assert [str(e) for e in errors] == [f"no such queue entry: {stored.id}"]
    assert_nothing_left(store)


def _increment_many(spool: Path, qid: str, times: int) -> None:
    s = JournalStore(spool)
    for _ in range(times):
        s.update(
            qid,
            lambda e: e.with_recipient(
                replace(e.recipients[0], attempts=e.recipients[0].attempts + 1)
            ),
        )


def test_concurrent_updates_from_two_processes_lose_nothing(store: JournalStore) -> None:
    stored = commit(store)
    ctx = multiprocessing.get_context("fork")
    times = 50
    args = (store.path, stored.id, times)
    procs = [ctx.Process(target=_increment_many, args=args) for _ in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert store.load(stored.id).recipients[0].attempts == 2 * times
    assert listing(store.tmp_dir) == []


def test_store_is_usable_from_a_second_instance(store: JournalStore) -> None:
    stored = commit(store)
    other = JournalStore(store.path)
    assert other.load(stored.id) == stored

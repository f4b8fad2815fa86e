"""The spool store as plain functions in tmp_path: commit, modes, recovery, full disks, locks.

Tests of the Store API run against both backends (the `store` fixture); tests of the files
layout use `files_store`. The journal's own layout is tested in test_journal.py."""

from __future__ import annotations

import errno
import json
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
from mailgate.spool.entry import Attempt, Envelope, Recipient
from mailgate.spool.ids import QUEUE_ID_LENGTH, is_queue_id, new_queue_id
from mailgate.spool.journal import JournalStore
from mailgate.spool.store import MEMORY_LIMIT, Incoming, NotFound, RecoveryReport, Store
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


def commit(store: Store, body: bytes = BODY, prefix: bytes = PREFIX) -> Envelope:
    incoming = store.begin()
    incoming.write(body)
    return store.commit(incoming, envelope(incoming.qid), prefix)


@pytest.fixture(params=["files", "journal"])
def store(tmp_path: Path, request: pytest.FixtureRequest) -> Store:
    """Each backend, for the tests of the Store API (both keep the same contract)."""
    if request.param == "journal":
        return JournalStore(tmp_path / "spool")
    return Store(tmp_path / "spool")


@pytest.fixture
def files_store(tmp_path: Path) -> Store:
    """The files backend, for the tests of its layout (msg/, env/, renames, fsync order)."""
    return Store(tmp_path / "spool")


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


def test_store_creates_its_directories_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        s = Store(tmp_path / "a" / "spool")
    finally:
        os.umask(old)
    for d in (s.path, s.tmp_dir, s.msg_dir, s.env_dir, s.corrupt_dir):
        assert d.is_dir()
        assert mode(d) == 0o700


def test_commit_then_load(files_store: Store) -> None:
    store = files_store
    incoming = store.begin()
    assert is_queue_id(incoming.qid)
    incoming.write(BODY[:10])
    incoming.write(BODY[10:])
    assert incoming.size == len(BODY)
    assert incoming.getvalue() == BODY
    stored = store.commit(incoming, envelope(incoming.qid), PREFIX)

    assert stored == replace(envelope(incoming.qid), size=len(PREFIX) + len(BODY))
    assert store.load(incoming.qid) == stored
    assert store.read_message(incoming.qid) == PREFIX + BODY
    assert store.message_path(incoming.qid) == store.msg_dir / f"{incoming.qid}.eml"
    assert store.ids() == [incoming.qid]
    assert listing(store.tmp_dir) == []
    raw = json.loads((store.env_dir / f"{incoming.qid}.json").read_bytes())
    assert raw["version"] == 1
    assert raw["held"] is False
    assert raw["recipients"][0]["state"] == "pending"


def test_committed_files_are_0600_whatever_the_umask(files_store: Store) -> None:
    store = files_store
    old = os.umask(0)
    try:
        stored = commit(store)
        big = commit(store, body=b"x" * (MEMORY_LIMIT + 1), prefix=b"")
    finally:
        os.umask(old)
    for qid in (stored.id, big.id):
        assert mode(store.message_path(qid)) == 0o600
        assert mode(store.env_dir / f"{qid}.json") == 0o600


def test_commit_fills_in_an_empty_envelope_id(store: Store) -> None:
    incoming = store.begin()
    incoming.write(BODY)
    stored = store.commit(incoming, envelope(""))
    assert stored.id == incoming.qid
    assert store.load(incoming.qid).id == incoming.qid


def test_commit_refuses_a_foreign_id_and_a_second_commit(store: Store) -> None:
    incoming = store.begin()
    incoming.write(BODY)
    with pytest.raises(UsageError):
        store.commit(incoming, envelope("0000000000OTHER"))
    store.commit(incoming, envelope(incoming.qid))
    with pytest.raises(UsageError):
        store.commit(incoming, envelope(incoming.qid))
    with pytest.raises(UsageError):
        incoming.write(b"more")


def test_abort_after_handing_over_to_a_commit_is_a_no_op(store: Store) -> None:
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


def test_ids_are_oldest_first_and_ignore_strangers(files_store: Store) -> None:
    store = files_store
    made = [commit(store).id for _ in range(5)]
    (store.env_dir / "README.txt").write_text("not an entry")
    (store.env_dir / "lower.json").write_text("{}")
    assert store.ids() == made


def test_large_message_spills_to_tmp_and_memory_stays_bounded(store: Store) -> None:
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


def test_spilled_message_without_prefix_is_renamed_into_place(files_store: Store) -> None:
    store = files_store
    body = b"y" * (MEMORY_LIMIT + 10)
    incoming = store.begin()
    incoming.write(body)
    inode = os.stat(incoming.spill_path).st_ino
    stored = store.commit(incoming, envelope(incoming.qid))
    assert os.stat(store.message_path(stored.id)).st_ino == inode
    assert store.read_message(stored.id) == body
    assert listing(store.tmp_dir) == []


@pytest.mark.parametrize("first", [1000, MEMORY_LIMIT + 1])
@pytest.mark.parametrize("second", [500, MEMORY_LIMIT + 2])
def test_replace_discards_what_was_written(store: Store, first: int, second: int) -> None:
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


def test_open_reader_streams_a_message_held_in_memory(store: Store) -> None:
    incoming = store.begin()
    incoming.write(BODY)
    with incoming.open_reader() as reader:
        assert reader.read() == BODY
    incoming.abort()


def test_abort_discards_and_is_idempotent(store: Store) -> None:
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


def test_enqueue_allocates_an_id_or_uses_the_given_one(store: Store) -> None:
    stored = store.enqueue(envelope(""), b"bounce\r\n")
    assert is_queue_id(stored.id)
    assert store.read_message(stored.id) == b"bounce\r\n"
    assert stored.size == 8
    qid = new_queue_id()
    assert store.enqueue(envelope(qid), b"dsn\r\n").id == qid
    with pytest.raises(SpoolError, match="already in use"):
        store.enqueue(envelope(qid), b"again\r\n")
    assert store.read_message(qid) == b"dsn\r\n"


def test_load_unknown_invalid_and_corrupt(files_store: Store) -> None:
    store = files_store
    with pytest.raises(NotFound, match=r"^no such queue entry: 0000000000AAAA$"):
        store.load("0000000000AAAA")
    with pytest.raises(NotFound, match=r"^no such queue entry: \.\./\.\./etc/passwd$"):
        store.load("../../etc/passwd")
    with pytest.raises(NotFound):
        store.read_message("0000000000AAAA")
    stored = commit(store)
    (store.env_dir / f"{stored.id}.json").write_bytes(b"{not json")
    with pytest.raises(SpoolError, match="unreadable envelope") as info:
        store.load(stored.id)
    assert not isinstance(info.value, NotFound)


def test_read_headers_stops_at_the_empty_line(store: Store) -> None:
    stored = commit(store)
    assert store.read_headers(stored.id) == PREFIX + b"From: alice@example.ac.uk\r\nSubject: hi\r\n"
    no_body = commit(store, body=b"Subject: x\r\n", prefix=b"")
    assert store.read_headers(no_body.id) == b"Subject: x\r\n"


# --- recovery: each interrupted step of commit() ----------------------------------------


def test_recover_on_a_clean_spool(store: Store) -> None:
    commit(store)
    assert store.recover() == RecoveryReport(entries=1)


def test_recover_each_interrupted_commit_step(files_store: Store) -> None:
    store = files_store
    kept = commit(store)

    # 1. receiving: a spilled file in tmp/.  2. msg written to tmp/, not renamed.
    # 3. env written to tmp/, not renamed (msg already in msg/).  4. an update's tmp file.
    (store.tmp_dir / "0000000000AAAA.data").write_bytes(b"partial")
    (store.tmp_dir / "0000000000BBBB.msg").write_bytes(b"whole")
    (store.tmp_dir / "0000000000CCCC.env").write_bytes(b"{}")
    (store.tmp_dir / "0000000000DDDD.0123abcd.update").write_bytes(b"{}")
    (store.msg_dir / "0000000000CCCC.eml").write_bytes(b"renamed but no env")
    # 5. env without msg (msg rename lost in a crash, env's survived).
    (store.env_dir / "0000000000EEEE.json").write_bytes(envelope("0000000000EEEE").to_json())
    # 6. an env that does not parse, and one that names another id.
    (store.env_dir / "0000000000FFFF.json").write_bytes(b'{"version": 1, "trunc')
    (store.msg_dir / "0000000000FFFF.eml").write_bytes(b"message")
    (store.env_dir / "0000000000GGGG.json").write_bytes(envelope("0000000000ZZZZ").to_json())
    (store.msg_dir / "0000000000GGGG.eml").write_bytes(b"message")
    (store.env_dir / "0000000000HHHH.json").write_bytes(b"[]")
    (store.msg_dir / "0000000000HHHH.eml").write_bytes(b"message")

    report = store.recover()

    assert report == RecoveryReport(
        entries=1,
        tmp_removed=4,
        orphans_removed=("0000000000CCCC",),
        moved_to_corrupt=("0000000000EEEE", "0000000000FFFF", "0000000000GGGG", "0000000000HHHH"),
    )
    assert str(report) == (
        "entries=1 tmp_removed=4 orphans_removed=1"
        " moved_to_corrupt=0000000000EEEE,0000000000FFFF,0000000000GGGG,0000000000HHHH"
    )
    assert listing(store.tmp_dir) == []
    assert store.ids() == [kept.id]
    assert listing(store.msg_dir) == [f"{kept.id}.eml"]
    assert listing(store.corrupt_dir) == [
        "0000000000EEEE.json",
        "0000000000FFFF.eml",
        "0000000000FFFF.json",
        "0000000000GGGG.eml",
        "0000000000GGGG.json",
        "0000000000HHHH.eml",
        "0000000000HHHH.json",
    ]
    assert (store.corrupt_dir / "0000000000FFFF.eml").read_bytes() == b"message"
    assert store.load(kept.id) == kept


def test_recover_never_overwrites_what_is_in_corrupt(files_store: Store) -> None:
    store = files_store
    (store.corrupt_dir / "0000000000EEEE.json").write_bytes(b"older")
    (store.env_dir / "0000000000EEEE.json").write_bytes(b"newer")
    store.recover()
    assert (store.corrupt_dir / "0000000000EEEE.json").read_bytes() == b"older"
    assert (store.corrupt_dir / "0000000000EEEE.json.1").read_bytes() == b"newer"


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


def assert_nothing_left(store: Store) -> None:
    if isinstance(store, JournalStore):  # no file per entry: ask the store, and a fresh one
        assert JournalStore(store.path).ids() == []
    else:
        assert listing(store.msg_dir) == []
        assert listing(store.env_dir) == []
    assert listing(store.tmp_dir) == []
    assert store.ids() == []


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_full_disk_on_the_message_write_is_spool_full(
    files_store: Store, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    store = files_store
    incoming = store.begin()
    incoming.write(BODY)
    monkeypatch.setattr(os, "write", failing_after(os.write, 0, err))
    with pytest.raises(SpoolFull):
        store.commit(incoming, envelope(incoming.qid), PREFIX)
    monkeypatch.undo()
    assert_nothing_left(store)


@pytest.mark.parametrize("good_writes", [1, 2])
def test_full_disk_after_some_writes_leaves_nothing(
    files_store: Store, monkeypatch: pytest.MonkeyPatch, good_writes: int
) -> None:
    store = files_store
    # The message file takes two writes (prefix, body), the envelope the third: fail the body
    # (a half-written message file) or the envelope (the message is already in msg/).
    incoming = store.begin()
    incoming.write(BODY)
    monkeypatch.setattr(os, "write", failing_after(os.write, good_writes, errno.ENOSPC))
    with pytest.raises(SpoolFull):
        store.commit(incoming, envelope(incoming.qid), PREFIX)
    monkeypatch.undo()
    assert_nothing_left(store)


def test_full_disk_reported_by_fsync_is_spool_full(
    files_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = files_store
    incoming = store.begin()
    incoming.write(BODY)
    monkeypatch.setattr(os, "fsync", failing_after(os.fsync, 1, errno.ENOSPC))
    with pytest.raises(SpoolFull):
        store.commit(incoming, envelope(incoming.qid), PREFIX)
    monkeypatch.undo()
    assert_nothing_left(store)


def test_other_os_errors_are_spool_error_not_spool_full(
    files_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = files_store
    incoming = store.begin()
    incoming.write(BODY)
    monkeypatch.setattr(os, "write", failing_after(os.write, 0, errno.EIO))
    with pytest.raises(SpoolError) as info:
        store.commit(incoming, envelope(incoming.qid), PREFIX)
    monkeypatch.undo()
    assert type(info.value) is SpoolError
    assert_nothing_left(store)


@pytest.mark.parametrize("good_writes", [0, 1])
def test_full_disk_while_spilling_frees_the_file_and_fails_the_incoming(
    store: Store, monkeypatch: pytest.MonkeyPatch, good_writes: int
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


def test_directory_fsync_failure_fails_the_whole_batch(
    files_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = files_store
    ok = commit(store)
    items: list[tuple[Incoming, Envelope, bytes]] = []
    for _ in range(3):
        incoming = store.begin()
        incoming.write(BODY)
        items.append((incoming, envelope(incoming.qid), PREFIX))

    def is_dir(fd: int) -> bool:
        return stat.S_ISDIR(os.fstat(fd).st_mode)

    monkeypatch.setattr(os, "fsync", failing_after(os.fsync, 0, errno.ENOSPC, only=is_dir))
    results = store.commit_batch(items)
    monkeypatch.undo()
    assert [type(r) for r in results] == [SpoolFull, SpoolFull, SpoolFull]
    assert store.ids() == [ok.id]
    assert listing(store.msg_dir) == [f"{ok.id}.eml"]
    assert listing(store.tmp_dir) == []


def test_one_failed_entry_does_not_fail_its_batch(store: Store) -> None:
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


def test_update_is_atomic_and_keeps_modes(files_store: Store) -> None:
    store = files_store
    stored = commit(store)
    when = datetime(2026, 3, 1, 13, 0, tzinfo=UTC)
    attempt = Attempt(when, "deferred", "mx.example.org[127.0.0.2]", "451 4.7.1 greylisted")

    def deferred(e: Envelope) -> Envelope:
        r = e.recipients[0]
        return e.with_recipient(
            replace(
                r, attempts=1, next_attempt_at=when, last_reply=attempt.reply, history=(attempt,)
            )
        )

    new = store.update(stored.id, deferred)
    assert store.load(stored.id) == new
    assert new.recipients[0].history == (attempt,)
    assert mode(store.env_dir / f"{stored.id}.json") == 0o600
    assert listing(store.tmp_dir) == []
    with pytest.raises(UsageError):
        store.update(stored.id, lambda e: replace(e, id="0000000000OTHER"))
    with pytest.raises(NotFound):
        store.update("0000000000AAAA", lambda e: e)


def test_hold_release_flush_and_delete_poke_the_engine(store: Store) -> None:
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


def test_flush_all_touches_only_pending_recipients(store: Store) -> None:
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


def test_poke_steps_the_mtime_even_within_one_clock_tick(store: Store) -> None:
    marks = []
    for _ in range(20):
        store.poke()
        marks.append(store.wakeup_mtime())
    assert len(set(marks)) == 20


def test_remove_deletes_env_then_msg_and_missing_is_not_found(store: Store) -> None:
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
def held_update(store: Store) -> Iterator[tuple[Envelope, threading.Event, threading.Event]]:
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
    store: Store, held_update: tuple[Envelope, threading.Event, threading.Event]
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
    store: Store, held_update: tuple[Envelope, threading.Event, threading.Event]
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


def _increment_many(kind: type[Store], spool: Path, qid: str, times: int) -> None:
    s = kind(spool)
    for _ in range(times):
        s.update(
            qid,
            lambda e: e.with_recipient(
                replace(e.recipients[0], attempts=e.recipients[0].attempts + 1)
            ),
        )


def test_concurrent_updates_from_two_processes_lose_nothing(store: Store) -> None:
    stored = commit(store)
    ctx = multiprocessing.get_context("fork")
    times = 50
    args = (type(store), store.path, stored.id, times)
    procs = [ctx.Process(target=_increment_many, args=args) for _ in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert store.load(stored.id).recipients[0].attempts == 2 * times
    assert listing(store.tmp_dir) == []


def test_store_is_usable_from_a_second_instance(store: Store) -> None:
    stored = commit(store)
    other = type(store)(store.path)
    assert other.load(stored.id) == stored

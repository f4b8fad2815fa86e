"""The journal spool backend in tmp_path: records, full disks, torn writes, damage, tailing
between instances and processes, rotation, compaction (with crash points), format import."""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailgate import config
from mailgate.errors import ConfigError, SpoolError, SpoolFull, UsageError
from mailgate.spool import compaction, open_store, spool_exists
from mailgate.spool.api import NotFound, RecoveryReport, SpoolStore
from mailgate.spool.entry import Envelope, Recipient
from mailgate.spool.incoming import MEMORY_LIMIT, Incoming
from mailgate.spool.journal import JournalStore
from mailgate.spool.record import scan, segment_name
from tests.support.spool import break_envelope, write_files_entry
from tests.support.waiting import wait_for

RECEIVED_AT = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
PREFIX = b"Received: from client.test by mail.example.ac.uk\r\n"
BODY = b"From: alice@example.ac.uk\r\nSubject: hi\r\n\r\nHello\r\n"
HEADER = 36  # bytes of a segment header
FIRST = segment_name(1)


def envelope(qid: str = "", *rcpts: str) -> Envelope:
    return Envelope(
        id=qid,
        mail_from="alice@example.ac.uk",
        recipients=tuple(Recipient(a) for a in (rcpts or ("bob@example.org",))),
        received_at=RECEIVED_AT,
        service="submission",
        login="alice",
    )


def commit(store: SpoolStore, body: bytes = BODY, prefix: bytes = PREFIX) -> Envelope:
    incoming = store.begin()
    incoming.write(body)
    return store.commit(incoming, envelope(incoming.qid), prefix)


def staged(store: SpoolStore, bodies: list[bytes]) -> list[tuple[Incoming, Envelope, bytes]]:
    items = []
    for body in bodies:
        incoming = store.begin()
        incoming.write(body)
        items.append((incoming, envelope(incoming.qid), PREFIX))
    return items


def bump(e: Envelope) -> Envelope:
    return e.with_recipient(replace(e.recipients[0], attempts=e.recipients[0].attempts + 1))


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def segments(store: JournalStore) -> list[str]:
    return sorted(os.listdir(store.journal_dir))


def size(store: JournalStore, name: str = FIRST) -> int:
    return os.stat(store.journal_dir / name).st_size


def state(store: SpoolStore) -> dict[str, tuple[Envelope, bytes]]:
    """Everything a user of the store can see."""
    return {q: (store.load(q), store.read_message(q)) for q in store.ids()}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JournalStore]:
    s = JournalStore(tmp_path / "spool")
    yield s
    s.close()


# --- commit and read ---------------------------------------------------------------------


def test_directories_0700_and_files_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        s = JournalStore(tmp_path / "a" / "spool")
        commit(s)
    finally:
        os.umask(old)
    for d in (s.path, s.tmp_dir, s.journal_dir, s.corrupt_dir):
        assert mode(d) == 0o700
    assert mode(s.journal_dir / FIRST) == 0o600
    assert mode(s.lock_path) == 0o600
    assert not (s.path / "msg").exists() and not (s.path / "env").exists()


def test_commit_then_load_read_and_reopen(store: JournalStore) -> None:
    incoming = store.begin()
    incoming.write(BODY)
    stored = store.commit(incoming, envelope(incoming.qid), PREFIX)
    assert stored == replace(envelope(incoming.qid), size=len(PREFIX) + len(BODY))
    assert store.load(stored.id) == stored
    assert store.read_message(stored.id) == PREFIX + BODY
    assert store.read_headers(stored.id) == PREFIX + b"From: alice@example.ac.uk\r\nSubject: hi\r\n"
    assert store.read_headers(stored.id, limit=10) == PREFIX[:10]
    assert store.ids() == [stored.id]
    assert os.listdir(store.tmp_dir) == []
    assert state(JournalStore(store.path)) == {stored.id: (stored, PREFIX + BODY)}


def test_ids_oldest_first_and_unknown_ids_not_found(store: JournalStore) -> None:
    made = [commit(store).id for _ in range(5)]
    assert store.ids() == made
    for qid in ("0000000000AAAA", "../../etc/passwd", "lower"):
        with pytest.raises(NotFound, match=f"^no such queue entry: {qid}$"):
            store.load(qid)
        with pytest.raises(NotFound):
            store.read_message(qid)
        with pytest.raises(NotFound):
            store.update(qid, bump)
        with pytest.raises(NotFound):
            store.remove(qid)


def test_no_file_per_entry(store: JournalStore) -> None:
    commit(store)
    commit(store, body=b"x" * (MEMORY_LIMIT + 1))  # spilled to tmp/, then copied in
    assert sorted(os.listdir(store.path)) == ["corrupt", "journal", "journal.lock", "tmp"]
    assert segments(store) == [FIRST] and os.listdir(store.tmp_dir) == []


def test_large_message_is_copied_from_its_spill_file(store: JournalStore) -> None:
    body = bytes(range(256)) * (4 * MEMORY_LIMIT // 256 + 3)  # > 1 MiB: the large read path
    incoming = store.begin()
    incoming.write(body)
    assert incoming.is_spilled
    stored = store.commit(incoming, envelope(incoming.qid), PREFIX)
    assert stored.size == len(PREFIX) + len(body)
    assert os.listdir(store.tmp_dir) == []
    assert store.read_message(stored.id) == PREFIX + body
    assert JournalStore(store.path).read_message(stored.id) == PREFIX + body
    assert store.read_headers(stored.id, limit=len(PREFIX) + 5) == PREFIX + body[:5]


def test_copy_without_copy_file_range_falls_back_to_read_write(
    store: JournalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(*args: object) -> int:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    stored = commit(store, body=b"z" * (MEMORY_LIMIT + 5), prefix=b"")
    monkeypatch.undo()
    assert JournalStore(store.path).read_message(stored.id) == b"z" * (MEMORY_LIMIT + 5)


def test_enqueue_and_taken_ids(store: JournalStore) -> None:
    stored = store.enqueue(envelope(""), b"bounce\r\n")
    assert store.read_message(stored.id) == b"bounce\r\n"
    with pytest.raises(SpoolError, match="already in use"):
        store.enqueue(envelope(stored.id), b"again\r\n")
    # Another instance (another process) committed this id after we began it: refused at
    # commit time, under the lock, after reading what the other one appended.
    other = JournalStore(store.path)
    incoming = other.begin()
    incoming.write(BODY)
    store.enqueue(envelope(incoming.qid), b"first\r\n")
    with pytest.raises(SpoolError, match="already in use"):
        other.commit(incoming, envelope(incoming.qid))
    assert other.read_message(incoming.qid) == b"first\r\n"


def test_commit_refuses_a_foreign_id_and_a_second_commit(store: JournalStore) -> None:
    incoming = store.begin()
    incoming.write(BODY)
    with pytest.raises(UsageError):
        store.commit(incoming, envelope("0000000000OTHER"))
    store.commit(incoming, envelope(incoming.qid))
    with pytest.raises(UsageError):
        store.commit(incoming, envelope(incoming.qid))


class Counting:
    """Counts calls of some os functions (the real ones still run)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
        self.calls: dict[str, int] = dict.fromkeys(names, 0)
        for name in names:
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self._counting(name, real))

    def _counting(self, name: str, real: Callable[..., object]) -> Callable[..., object]:
        def counted(*args: object, **kwargs: object) -> object:
            self.calls[name] += 1
            return real(*args, **kwargs)

        return counted


def test_a_batch_is_one_write_and_one_fdatasync(
    store: JournalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit(store)  # the segment exists: no directory fsync from here on
    items = staged(store, [b"x" * 10240 + b"%d" % n for n in range(20)])
    calls = Counting(monkeypatch, "write", "fdatasync", "fsync", "open")
    results = store.commit_batch(items)
    monkeypatch.undo()
    assert all(isinstance(r, Envelope) for r in results)
    assert calls.calls == {"write": 1, "fdatasync": 1, "fsync": 0, "open": 1}  # open: the lock
    assert len(store.ids()) == 21


def test_a_new_segment_is_made_durable_by_name_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = JournalStore(tmp_path / "spool")
    calls = Counting(monkeypatch, "fdatasync", "fsync")
    commit(s)
    monkeypatch.undo()
    assert calls.calls == {"fdatasync": 1, "fsync": 1}  # the segment, then journal/


# --- full disks and other write errors ------------------------------------------------------


def failing(real: Callable[..., object], err: int, budget: int = 0) -> Callable[..., object]:
    """`real` write-like function that stores at most `budget` more bytes, then raises `err`."""
    left = budget

    def fake(fd: int, data: bytes, *rest: object) -> object:
        nonlocal left
        if left <= 0:
            raise OSError(err, os.strerror(err))
        n = real(fd, bytes(memoryview(data)[:left]), *rest)
        assert isinstance(n, int)
        left -= n
        return n

    return fake


def assert_nothing_committed(store: JournalStore, before: int) -> None:
    assert store.ids() == []
    assert size(store) == before  # cut back: no bytes of the failed commit are left
    assert JournalStore(store.path).ids() == []
    assert os.listdir(store.tmp_dir) == []


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_full_disk_on_write_is_spool_full_and_leaves_nothing(
    store: JournalStore, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    items = staged(store, [BODY, BODY])
    monkeypatch.setattr(os, "write", failing(os.write, err))
    results = store.commit_batch(items)
    monkeypatch.undo()
    assert [type(r) for r in results] == [SpoolFull, SpoolFull]
    # The first segment's header could not be written either: no segment at all.
    assert segments(store) == []
    assert store.ids() == [] and JournalStore(store.path).ids() == []


def test_full_disk_midway_keeps_the_whole_records_before_it(
    store: JournalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit(store)
    committed = store.ids()
    start = size(store)
    items = staged(store, [b"a" * 1000, b"b" * 1000, b"c" * 10, b"d" * 1000])
    record = (size(store), store.commit_batch(staged(store, [b"a" * 1000]))[0])
    assert isinstance(record[1], Envelope)
    one = size(store) - record[0]  # the length of one record of a 1000-byte message
    store.remove(record[1].id)
    start = size(store)
    # Room for the first record and half of the second: the second fails, and so do the
    # later ones (the disk stays full), but the first is committed.
    monkeypatch.setattr(os, "write", failing(os.write, errno.ENOSPC, one + one // 2))
    results = store.commit_batch(items)
    monkeypatch.undo()
    assert isinstance(results[0], Envelope)
    assert [type(r) for r in results[1:]] == [SpoolFull, SpoolFull, SpoolFull]
    assert size(store) == start + one
    assert store.ids() == sorted([*committed, results[0].id])
    assert state(JournalStore(store.path)) == state(store)


def test_full_disk_at_fdatasync_fails_the_batch_and_leaves_nothing(
    store: JournalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit(store)
    old = store.ids()
    before = size(store)
    items = staged(store, [BODY, b"y" * (MEMORY_LIMIT + 1)])

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fdatasync", full)
    results = store.commit_batch(items)
    monkeypatch.undo()
    assert [type(r) for r in results] == [SpoolFull, SpoolFull]
    assert size(store) == before
    assert store.ids() == old and JournalStore(store.path).ids() == old
    assert os.listdir(store.tmp_dir) == []


def test_full_disk_while_copying_a_spilled_message(
    store: JournalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit(store)
    before = size(store)
    items = staged(store, [b"s" * (MEMORY_LIMIT + 1), BODY])

    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "copy_file_range", full)
    results = store.commit_batch(items)
    monkeypatch.undo()
    assert isinstance(results[0], SpoolFull)
    assert isinstance(results[1], Envelope)  # one entry's failure is its own
    assert len(store.ids()) == 2
    assert size(store) > before
    assert state(JournalStore(store.path)) == state(store)
    assert os.listdir(store.tmp_dir) == []


def test_other_errors_are_spool_error_not_spool_full(
    store: JournalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit(store)
    before = size(store)
    items = staged(store, [BODY])
    monkeypatch.setattr(os, "write", failing(os.write, errno.EIO))
    [result] = store.commit_batch(items)
    monkeypatch.undo()
    assert type(result) is SpoolError
    assert size(store) == before


def test_an_update_that_cannot_sync_changes_nothing(
    store: JournalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = commit(store)
    before = size(store)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fdatasync", full)
    with pytest.raises(SpoolFull):
        store.update(stored.id, bump)
    monkeypatch.undo()
    assert size(store) == before
    assert store.load(stored.id) == stored
    assert JournalStore(store.path).load(stored.id) == stored


def test_a_removal_is_written_for_every_process_without_its_own_fdatasync(
    store: JournalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored, other = commit(store), commit(store)
    calls = Counting(monkeypatch, "write", "fdatasync", "fsync")
    store.remove(stored.id)
    assert calls.calls == {"write": 1, "fdatasync": 0, "fsync": 0}
    monkeypatch.undo()
    assert stored.id not in JournalStore(store.path).ids()  # another process sees it gone
    # an update in the same batch (or the next commit) fdatasyncs the removal with it
    calls = Counting(monkeypatch, "fdatasync")
    store.update(other.id, bump)
    assert calls.calls == {"fdatasync": 1}


def test_a_change_batch_applies_updates_and_removals_in_order_with_one_write(
    store: JournalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c = commit(store), commit(store), commit(store)
    calls = Counting(monkeypatch, "write", "fdatasync")
    results = store.change_batch(
        [(a.id, None), (b.id, bump), (b.id, bump), ("X" * 12, None), (c.id, bump), (c.id, None),
         (a.id, bump)]
    )  # fmt: skip
    assert calls.calls == {"write": 1, "fdatasync": 1}  # an update is among them: synced
    monkeypatch.undo()
    assert results[0] is None
    assert isinstance(results[1], Envelope) and results[1].recipients[0].attempts == 1
    assert isinstance(results[2], Envelope) and results[2].recipients[0].attempts == 2
    assert type(results[3]) is NotFound  # no such entry: its neighbours go on
    assert isinstance(results[4], Envelope) and results[5] is None  # updated, then removed
    assert type(results[6]) is NotFound  # removed earlier in the same batch
    assert store.ids() == [b.id]
    assert state(JournalStore(store.path)) == state(store)
    assert store.load(b.id) == results[2]


def test_a_change_batch_of_removals_alone_is_not_synced(
    store: JournalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = [commit(store) for _ in range(3)]
    calls = Counting(monkeypatch, "write", "fdatasync")
    assert store.change_batch([(e.id, None) for e in stored]) == [None, None, None]
    assert calls.calls == {"write": 1, "fdatasync": 0}  # like remove(): see the docstring
    monkeypatch.undo()
    assert store.ids() == [] and JournalStore(store.path).ids() == []


def test_a_change_batch_that_cannot_be_written_changes_nothing(
    store: JournalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = commit(store), commit(store)
    before = size(store)
    monkeypatch.setattr(os, "write", failing(os.write, errno.ENOSPC))
    results = store.change_batch([(a.id, None), (b.id, bump)])
    monkeypatch.undo()
    assert [type(r) for r in results] == [SpoolFull, SpoolFull]
    assert size(store) == before
    assert state(store) == state(JournalStore(store.path))
    assert store.ids() == sorted([a.id, b.id]) and store.load(b.id) == b


def test_a_directory_fsync_failure_fails_the_batch_that_made_the_segment(
    store: JournalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = staged(store, [BODY, BODY])

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    results = store.commit_batch(items)
    monkeypatch.undo()
    assert [type(r) for r in results] == [SpoolError, SpoolError]
    assert store.ids() == [] and JournalStore(store.path).ids() == []
    stored = commit(store)  # the next batch makes the name durable
    assert JournalStore(store.path).ids() == [stored.id]


def test_commits_leave_a_reserve_for_updates_and_removals(
    store: JournalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = commit(store)
    before = size(store)
    real = os.statvfs

    def nearly_full(path: object) -> os.statvfs_result:
        st = real(path)  # type: ignore[arg-type]  # the store passes a Path
        blocks = (1 << 30) // st.f_frsize  # a 1 GiB file system: the reserve is 8 MiB
        free = (4 << 20) // st.f_frsize  # 4 MiB free
        return os.statvfs_result((st.f_bsize, st.f_frsize, blocks, free, free, *st[5:]))

    monkeypatch.setattr(os, "statvfs", nearly_full)
    with pytest.raises(SpoolFull, match="nearly full"):
        commit(store)
    assert size(store) == before
    assert store.update(stored.id, bump).recipients[0].attempts == 1  # the engine goes on
    store.remove(stored.id)
    monkeypatch.undo()
    assert JournalStore(store.path).ids() == []
    assert os.listdir(store.tmp_dir) == []


# --- torn writes and damage ------------------------------------------------------------------


def test_recover_after_a_cut_at_every_byte_of_the_last_record(tmp_path: Path) -> None:
    original = JournalStore(tmp_path / "original")
    kept = [commit(original) for _ in range(3)]
    start = size(original)
    last = commit(original, body=b"Subject: last\r\n\r\n" + b"L" * 200)
    whole = (original.journal_dir / FIRST).read_bytes()
    expected = state(original)
    del expected[last.id]
    spool = tmp_path / "spool"
    (spool / "journal").mkdir(parents=True)
    for cut in range(start, len(whole) + 1):  # bounded: one record's bytes
        for name in os.listdir(spool / "journal"):
            (spool / "journal" / name).unlink()
        (spool / "journal" / FIRST).write_bytes(whole[:cut])
        s = JournalStore(spool)
        report = s.recover()
        if cut == len(whole):
            assert report == RecoveryReport(entries=4)
            assert s.ids() == [*(k.id for k in kept), last.id]
            continue
        qid_known = cut - start >= 24 + len(last.id)
        assert report == RecoveryReport(
            entries=3, orphans_removed=(last.id,) if qid_known and cut > start else ()
        ), cut
        assert state(s) == expected, cut
        assert size(s) == start  # the torn tail is cut away
        assert os.listdir(s.corrupt_dir) == []  # a torn tail is not damage
        if cut % 50 == 0:  # appending after the cut works (sampled: each costs an fsync)
            again = commit(s)
            assert JournalStore(spool).ids() == [*(k.id for k in kept), again.id]
        s.close()
    original.close()


@pytest.mark.parametrize("where", [0, 8, 9, 12, 20, 24, 30, 50, 300, -1])
def test_a_flipped_byte_in_the_last_record_is_a_torn_tail(tmp_path: Path, where: int) -> None:
    s = JournalStore(tmp_path / "spool")
    first = commit(s)
    start = size(s)
    commit(s, body=b"x" * 400)
    path = s.journal_dir / FIRST
    data = bytearray(path.read_bytes())
    data[start + where if where >= 0 else where] ^= 0x40
    path.write_bytes(bytes(data))
    fresh = JournalStore(s.path)
    assert fresh.ids() == [first.id]  # a reader ignores it even before recovery
    report = fresh.recover()
    assert report.entries == 1 and report.moved_to_corrupt == ()
    assert fresh.ids() == [first.id]
    assert size(fresh) == start


def test_damage_in_the_middle_keeps_what_parses_and_copies_the_segment(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = JournalStore(tmp_path / "spool")
    a = commit(s)
    middle = size(s)
    b = commit(s, body=b"Subject: b\r\n\r\n" + b"b" * 300)
    c, d = commit(s), commit(s)
    s.update(c.id, bump)
    expected = state(s)
    del expected[b.id]
    path = s.journal_dir / FIRST
    data = bytearray(path.read_bytes())
    data[middle + 200] ^= 0x01  # inside b's record
    path.write_bytes(bytes(data))
    damaged = bytes(data)

    fresh = JournalStore(s.path)
    assert state(fresh) == expected  # readers skip the damaged record
    with caplog.at_level(logging.ERROR, logger="mailgate.spool.journal"):
        report = fresh.recover()
    assert report.entries == 3
    assert state(fresh) == expected
    assert os.listdir(fresh.corrupt_dir) == [FIRST]
    assert (fresh.corrupt_dir / FIRST).read_bytes() == damaged
    assert "damaged" in caplog.text
    assert sorted(fresh.ids()) == sorted([a.id, c.id, d.id])
    # Appending after the damage works, and a second startup copies nothing again.
    e = commit(fresh)
    again = JournalStore(s.path)
    again.recover()
    assert os.listdir(again.corrupt_dir) == [FIRST]
    assert again.ids() == sorted([a.id, c.id, d.id, e.id])


def test_a_torn_tail_left_by_a_dead_writer_is_cut_by_the_next_writer(tmp_path: Path) -> None:
    s = JournalStore(tmp_path / "spool")
    a = commit(s)
    start = size(s)
    b = commit(s, body=b"b" * 500)
    path = s.journal_dir / FIRST
    whole = path.read_bytes()
    path.write_bytes(whole[: start + 100])  # b's append was interrupted (kill -9)
    reader = JournalStore(s.path)
    assert reader.ids() == [a.id]
    writer = JournalStore(s.path)
    c = commit(writer)  # no recover(): the writer cuts the tail before appending
    assert reader.ids() == [a.id, c.id]
    assert JournalStore(s.path).ids() == [a.id, c.id]
    assert b.id not in reader.ids()


def test_a_torn_segment_header_is_rewritten(tmp_path: Path) -> None:
    s = JournalStore(tmp_path / "spool", segment_size=1024)
    a = commit(s, body=b"a" * 2000)  # fills segment 1
    (s.journal_dir / segment_name(2)).write_bytes(b"MAILGATE-JR")  # crash while creating 2
    fresh = JournalStore(s.path, segment_size=1024)
    assert fresh.ids() == [a.id]
    b = commit(fresh)
    assert JournalStore(s.path).ids() == [a.id, b.id]
    assert segments(fresh) == [segment_name(1), segment_name(2)]
    assert fresh.recover().entries == 2


def test_a_damaged_segment_header_is_never_overwritten(tmp_path: Path) -> None:
    s = JournalStore(tmp_path / "spool", segment_size=1024)
    a = commit(s, body=b"a" * 2000)
    damaged = b"not a header" * 10  # bytes after a bad header: damage, not a torn creation
    (s.journal_dir / segment_name(2)).write_bytes(damaged)
    fresh = JournalStore(s.path, segment_size=1024)
    b = commit(fresh)
    assert (s.journal_dir / segment_name(2)).read_bytes() == damaged
    assert segment_name(3) in segments(fresh)
    assert fresh.recover().entries == 2
    assert (fresh.corrupt_dir / segment_name(2)).read_bytes() == damaged
    assert segments(fresh) == [segment_name(1), segment_name(3)]
    assert JournalStore(s.path).ids() == [a.id, b.id]


def test_an_unparsable_envelope_moves_to_corrupt_at_recovery(store: JournalStore) -> None:
    a, b = commit(store), commit(store)
    break_envelope(store, a.id, b'{"version": 1, "trunc')
    fresh = JournalStore(store.path)
    with pytest.raises(SpoolError, match="unreadable envelope") as info:
        fresh.load(a.id)
    assert not isinstance(info.value, NotFound)
    report = fresh.recover()
    assert report == RecoveryReport(entries=1, moved_to_corrupt=(a.id,))
    assert fresh.ids() == [b.id]
    assert (fresh.corrupt_dir / f"{a.id}.json").read_bytes() == b'{"version": 1, "trunc'
    assert (fresh.corrupt_dir / f"{a.id}.eml").read_bytes() == PREFIX + BODY
    assert JournalStore(store.path).ids() == [b.id]


def test_recover_empties_tmp(store: JournalStore) -> None:
    commit(store)
    (store.tmp_dir / "0000000000AAAA.data").write_bytes(b"partial")
    assert store.recover() == RecoveryReport(entries=1, tmp_removed=1)
    assert os.listdir(store.tmp_dir) == []


# --- several instances and processes -----------------------------------------------------------


def test_instances_see_each_others_changes(store: JournalStore) -> None:
    other = JournalStore(store.path)
    a = commit(store)
    assert other.ids() == [a.id]
    assert other.read_message(a.id) == PREFIX + BODY
    b = commit(other)
    assert store.read_message(b.id) == PREFIX + BODY  # unknown to it: it looks again
    other.hold(a.id)
    assert store.load(a.id).held
    store.update(a.id, bump)
    assert other.load(a.id).recipients[0].attempts == 1
    assert other.load(a.id).held
    other.remove(a.id)
    assert store.ids() == [b.id]
    with pytest.raises(NotFound):
        store.update(a.id, bump)


def _lock_waiters() -> int:
    """Lock requests waiting in the kernel (lines marked '->' in /proc/locks)."""
    with open("/proc/locks") as f:
        return sum(1 for line in f if "->" in line)


def test_concurrent_changes_share_one_write_and_one_fdatasync(
    store: JournalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = [commit(store) for _ in range(8)]
    first, twice, gone, other = made[0], made[1], made[2], made[3]
    inside, release = threading.Event(), threading.Event()

    def slow(e: Envelope) -> Envelope:
        inside.set()
        assert release.wait(5)
        return bump(e)

    def broken(e: Envelope) -> Envelope:
        raise ValueError("a bug in one change")

    holder = threading.Thread(target=store.update, args=(first.id, slow))
    holder.start()
    assert inside.wait(5)  # it holds the lock: everything below queues up behind it
    base = _lock_waiters()
    errors: dict[str, BaseException] = {}

    def call(name: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as e:
            errors[name] = e

    calls: list[tuple[str, Callable[[], object]]] = [
        ("bump1", lambda: store.update(twice.id, bump)),
        ("bump2", lambda: store.update(twice.id, bump)),
        ("remove", lambda: store.remove(gone.id)),
        ("after-remove", lambda: store.update(gone.id, bump)),
        ("broken", lambda: store.update(other.id, broken)),
        *((f"remove{n}", lambda n=n: store.remove(made[n].id)) for n in range(4, 8)),
    ]

    def waiters(n: int) -> Callable[[], bool]:
        return lambda: _lock_waiters() >= base + n

    threads: list[threading.Thread] = []
    for n, (name, fn) in enumerate(calls, start=1):  # one at a time: the queue has this order
        t = threading.Thread(target=call, args=(name, fn))
        t.start()
        wait_for(waiters(n))
        threads.append(t)
    calls_made = Counting(monkeypatch, "write", "fdatasync")
    release.set()
    for t in [holder, *threads]:
        t.join(5)
    monkeypatch.undo()
    assert calls_made.calls == {"write": 2, "fdatasync": 2}  # the holder's, then the batch's
    assert isinstance(errors.pop("after-remove"), NotFound)
    assert isinstance(errors.pop("broken"), ValueError)
    assert errors == {}
    assert store.ids() == [first.id, twice.id, other.id]
    assert store.load(twice.id).recipients[0].attempts == 2
    assert store.load(other.id) == other
    assert state(JournalStore(store.path)) == state(store)


def _increment_many(spool: Path, qid: str, times: int) -> None:
    s = JournalStore(spool)
    for _ in range(times):
        s.update(qid, bump)


def test_concurrent_updates_from_two_processes_lose_nothing(store: JournalStore) -> None:
    stored = commit(store)
    ctx = multiprocessing.get_context("fork")
    times = 50
    procs = [ctx.Process(target=_increment_many, args=(store.path, stored.id, times)) for _ in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert store.load(stored.id).recipients[0].attempts == 2 * times
    assert JournalStore(store.path).load(stored.id).recipients[0].attempts == 2 * times


def test_a_reader_follows_rotation(tmp_path: Path) -> None:
    writer = JournalStore(tmp_path / "spool", segment_size=2048)
    reader = JournalStore(writer.path)
    made = [commit(writer, body=b"m" * 700).id for _ in range(12)]
    assert len(segments(writer)) > 3
    assert reader.ids() == made
    assert all(reader.read_message(q) == PREFIX + b"m" * 700 for q in made)


# --- rotation and compaction ---------------------------------------------------------------


def test_segments_of_removed_entries_are_deleted_as_the_engine_removes(tmp_path: Path) -> None:
    s = JournalStore(tmp_path / "spool", segment_size=2048)
    made = [commit(s, body=b"m" * 700).id for _ in range(12)]
    assert len(segments(s)) >= 4
    for qid in made:
        s.remove(qid)
    assert len(segments(s)) == 1  # only the head stays
    assert s.ids() == [] and JournalStore(s.path).ids() == []


def test_compaction_copies_a_few_live_entries_forward(tmp_path: Path) -> None:
    s = JournalStore(tmp_path / "spool", segment_size=4096)
    made = [commit(s, body=bytes([65 + n]) * 600) for n in range(15)]
    s.update(made[0].id, bump)
    s.hold(made[1].id)
    expected = state(s)
    reader = JournalStore(s.path)
    for e in made[2:]:
        s.remove(e.id)
        del expected[e.id]
    assert len(segments(s)) == 1  # the two survivors were copied into the head
    assert state(s) == expected
    assert state(reader) == expected
    assert state(JournalStore(s.path)) == expected


def _snapshot(src: Path, dst: Path) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)


def test_compaction_survives_a_crash_after_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = tmp_path / "spool"
    s = JournalStore(spool, segment_size=8192)
    monkeypatch.setattr(compaction, "compact_quietly", lambda store: None)  # compact by hand
    made = [commit(s, body=bytes([65 + n]) * 500) for n in range(27)]
    for n, e in enumerate(made):
        if n % 9 == 0:
            s.update(e.id, bump)  # one survivor in each old segment
        else:
            s.remove(e.id)  # REMOVE records in newer segments than their COMMITs
    monkeypatch.undo()
    expected = state(s)
    assert len(expected) == 3
    s.close()
    before = tmp_path / "before"
    _snapshot(spool, before)
    old_files = sorted(os.listdir(before / "journal"))
    head = old_files[-1]
    head_before = (before / "journal" / head).stat().st_size
    assert len(old_files) == 4

    # The compaction itself (a head big enough to take the copies without rotating): for
    # each old segment, oldest first, copy its survivor into the head, fdatasync, delete it.
    c = JournalStore(spool, segment_size=1 << 20)
    assert c.compact() == 3
    assert sorted(os.listdir(c.journal_dir)) == [head]
    assert state(c) == expected
    head_after = (c.journal_dir / head).read_bytes()
    c.close()
    copies = scan(
        lambda n, at: head_after[at : at + n], head_after[24:32], head_before, len(head_after)
    ).records
    assert len(copies) == 3

    # A crash after deleting k old segments (so the first k copies were durable), with the
    # head cut anywhere after those copies: the old segments left and the copies that made
    # it must give the same entries. (Cuts before a deletion's copy are no real state.)
    checked = 0
    for k in range(len(old_files)):
        first_cut = copies[k - 1].end if k else head_before
        for cut in [*range(first_cut, len(head_after), 101), len(head_after)]:
            d = tmp_path / "crash"
            _snapshot(before, d)
            (d / "journal" / head).write_bytes(head_after[:cut])
            for name in old_files[:k]:
                (d / "journal" / name).unlink()
            r = JournalStore(d, segment_size=1 << 20)
            r.recover()
            assert state(r) == expected, (k, cut)
            assert state(JournalStore(d)) == expected, (k, cut)
            r.compact()
            assert sorted(os.listdir(r.journal_dir)) == [head], (k, cut)
            assert state(JournalStore(d)) == expected, (k, cut)
            r.close()
            checked += 1
    assert checked > 10


def test_a_reader_that_missed_compacted_segments_starts_over(tmp_path: Path) -> None:
    writer = JournalStore(tmp_path / "spool", segment_size=2048)
    first = [commit(writer, body=b"f" * 700) for _ in range(3)]
    reader = JournalStore(writer.path)
    assert reader.ids() == [e.id for e in first]
    later = [commit(writer, body=b"l" * 700) for _ in range(9)]
    for e in first:
        writer.remove(e.id)  # the segments the reader knew are gone, REMOVEs with them
    assert segment_name(1) not in segments(writer)
    assert reader.ids() == [e.id for e in later]
    assert reader.read_message(later[0].id) == PREFIX + b"l" * 700


# --- a files-format spool becomes a journal ---------------------------------------------------


def test_recover_imports_a_files_format_spool(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    env_dir, msg_dir = spool / "env", spool / "msg"
    a = bump(replace(envelope("0000000001AAAA"), size=len(PREFIX + BODY)))
    b = replace(envelope("0000000002BBBB"), size=MEMORY_LIMIT + 10, held=True)
    expected = {a.id: (a, PREFIX + BODY), b.id: (b, b"b" * (MEMORY_LIMIT + 10))}
    for env, message in expected.values():
        write_files_entry(spool, env, message)
    j = JournalStore(spool)
    assert j.recover().entries == 2
    assert state(j) == expected
    assert os.listdir(env_dir) == [] and os.listdir(msg_dir) == []
    assert state(JournalStore(spool)) == expected
    # A crash after the journal got an entry but before its files went: not imported twice,
    # and the journal (maybe changed since) stays the truth.
    j.update(a.id, bump)
    write_files_entry(spool, expected[a.id][0], expected[a.id][1])
    j.recover()
    assert j.load(a.id).recipients[0].attempts == 2
    assert os.listdir(env_dir) == []


def test_open_store_opens_the_journal_and_spool_exists_knows_both_layouts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config.SpoolConfig(tmp_path / "spool")
    assert not spool_exists(cfg)
    s = open_store(cfg)
    assert isinstance(s, JournalStore)
    assert spool_exists(cfg)
    old = config.SpoolConfig(tmp_path / "old")
    write_files_entry(old.path, envelope("0000000001AAAA"), BODY)
    assert spool_exists(old)  # `mailgate queue` may open it; `serve` imports it at startup
    with caplog.at_level(logging.WARNING, logger="mailgate.spool"):
        assert open_store(old).ids() == []
    assert "moves them into the journal at startup" in caplog.text


def test_spool_format_defaults_to_journal(tmp_path: Path) -> None:
    assert config.parse("", tmp_path / "mailgate.toml").spool.format == "journal"


def test_spool_format_config(tmp_path: Path) -> None:
    cfg = config.parse('[spool]\nformat = "journal"\n', tmp_path / "mailgate.toml")
    assert cfg.spool.format == "journal"


@pytest.mark.parametrize("value", ['"log"', "1", '""'])
def test_spool_format_config_names_the_key(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r'^spool.format: expected "journal"$'):
        config.parse(f"[spool]\nformat = {value}\n", tmp_path / "mailgate.toml")


def test_spool_format_files_is_refused_with_the_way_out(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r'^spool.format: "files" is no longer supported; remove'):
        config.parse('[spool]\nformat = "files"\n', tmp_path / "mailgate.toml")

"""tracelog: what is recorded, how `trace` finds it, status counts, retention (no server)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest

from mailgate import tracelog
from mailgate.config import TraceConfig
from mailgate.tracelog import query, store


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    tracelog.start(TraceConfig(path=tmp_path / "trace"))
    try:
        yield tmp_path / "trace"
    finally:
        tracelog.stop()


def accept(qid: str, *, login: str = "alice", client: str = "192.0.2.7",
           rcpts: tuple[str, ...] = ("bob@example.net",)) -> None:  # fmt: skip
    tracelog.accepted(qid, mail_from="Alice@Example.org", rcpts=rcpts, size=100, login=login,
                      service="submission", client=client, sid="S1",
                      message_id="<Abc.1@client.test>")  # fmt: skip


def test_nothing_is_recorded_before_start(tmp_path: Path) -> None:
    accept("Q0")  # no writer: a no-op, never an error
    assert not (tmp_path / "trace").exists()


@pytest.mark.parametrize(
    "key",
    ["Q1", "q1", "<Abc.1@client.test>", "abc.1@CLIENT.test", "alice@example.org", "ALICE",
     "bob@example.net", " <bob@example.net> "],
)  # fmt: skip
def test_a_message_is_found_by_every_key(folder: Path, key: str) -> None:
    accept("Q1")
    tracelog.outcome("Q1", status="delivered", rcpt="bob@example.net", relay="mx[192.0.2.1]:25",
                     reply="250 2.0.0 ok", tls=True, delay=0.5)  # fmt: skip
    tracelog.removed("Q1")
    accept("Q2", login="carol", rcpts=("dave@example.net",))
    tracelog.stop()
    [found] = [t for t in query.find(folder, key) if t.qid == "Q1"]
    assert [e["kind"] for e in found.events] == ["accepted", "delivered", "removed"]
    assert found.status == "delivered"


def test_status_of_a_message(folder: Path) -> None:
    accept("B1", rcpts=("a@x.test", "b@x.test"))
    tracelog.outcome("B1", status="deferred", rcpt="a@x.test", relay="none", reply="451",
                     tls=False, delay=1)  # fmt: skip
    tracelog.outcome("B1", status="delivered", rcpt="a@x.test", relay="mx", reply="250",
                     tls=False, delay=2)  # fmt: skip
    tracelog.outcome("B1", status="bounced", rcpt="b@x.test", relay="mx", reply="550",
                     tls=False, delay=2)  # fmt: skip
    tracelog.dsn("B1", action="failed", dsn_qid="D1", to="alice@example.org")
    tracelog.queued("D1", mail_from="", rcpts=["alice@example.org"], service="bounce",
                    about="B1")  # fmt: skip
    tracelog.removed("B1")
    accept("B2")
    accept("B4")
    tracelog.by_operator("B4", "held")
    tracelog.by_operator("B4", "deleted")
    tracelog.rejected("B3", mail_from="alice@example.org", rcpts=["c@x.test"], login="alice",
                      service="submission", client="192.0.2.7", sid="S2",
                      reply="554 5.7.1 virus")  # fmt: skip
    tracelog.stop()
    found = {t.qid: t for t in query.find(folder, "alice@example.org")}
    assert found["B1"].status == "partly bounced"
    assert found["B2"].status == "queued"
    assert found["B3"].status == "rejected"
    assert found["B4"].status == "deleted"
    assert [e["kind"] for e in found["B4"].events] == ["accepted", "held", "deleted"]
    assert found["D1"].status == "queued"  # its own delivery is not recorded yet
    assert {t.qid for t in query.find(folder, "B1")} == {"B1", "D1"}  # the bounce, too


def test_summary_of_the_last_hour(folder: Path) -> None:
    accept("S1", client="192.0.2.7", rcpts=("a@x.test", "b@x.test"))
    accept("S2", client="192.0.2.200")
    accept("S3", login="", client="2001:db8::1")
    tracelog.refused(command="RCPT", address="x@y.test", login="", service="smarthost",
                     client="198.51.100.1", sid="S9", reply="550 5.7.1 Relay")  # fmt: skip
    tracelog.outcome("S1", status="bounced", rcpt="a@x.test", relay="mx", reply="550",
                     tls=False, delay=1)  # fmt: skip
    tracelog.stop()
    summary = query.summarise(folder, time.time() - 3600)
    assert summary.counts == {"accepted": 3, "refused": 1, "delivered": 0, "deferred": 0,
                              "bounced": 1}  # fmt: skip
    assert summary.top_logins == [("alice", 2, 3)]
    assert summary.top_networks == [("192.0.2.0/24", 2, 3), ("2001:db8::/64", 1, 1)]
    assert query.summarise(folder, time.time() + 120).counts["accepted"] == 0


def test_retention_deletes_whole_old_days(tmp_path: Path) -> None:
    days = [date(2026, 11, d) for d in (1, 2, 3, 4)]
    for day in days:
        conn = store.connect(store.day_path(tmp_path, day), write=True)
        store.append(conn, [store.Event(0.0, "Q", "accepted", ("q",), {"pad": "x" * 700_000})])
        conn.close()
    removed = store.prune(tmp_path, retention_days=2, max_size_mb=0, today=date(2026, 11, 4))
    assert [p.name for p in removed] == [store.day_path(tmp_path, d).name for d in days[:2]]
    assert [d for d, _ in store.day_files(tmp_path)] == days[2:]
    # A size limit removes the oldest remaining days too, never today's.
    removed = store.prune(tmp_path, retention_days=30, max_size_mb=0, today=date(2026, 11, 4))
    assert removed == []
    store.prune(tmp_path, retention_days=30, max_size_mb=1, today=date(2026, 11, 4))
    assert [d for d, _ in store.day_files(tmp_path)] == [date(2026, 11, 4)]


def test_a_forked_child_does_not_use_the_parents_writer(folder: Path) -> None:
    pid = os.fork()
    if pid == 0:  # the child: its first event must not touch the parent's buffer or thread
        code = 0 if tracelog._writer is None else 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_day_file_not_yet_given_its_tables_is_skipped(folder: Path) -> None:
    accept("E1")
    tracelog.stop()
    store.day_path(folder, date(2030, 1, 1)).touch()  # what a writer creates before its schema
    assert [t.qid for t in query.find(folder, "E1")] == ["E1"]
    assert query.summarise(folder, 0).counts["accepted"] == 1


def test_traffic_by_hour(tmp_path: Path) -> None:
    start = 1_764_720_000.0  # 2025-12-03 00:00 UTC, a whole hour
    conn = store.connect(store.day_path(tmp_path, date(2025, 12, 3)), write=True)
    events = [
        store.Event(start + 10, "Q1", "accepted", ("q1",), {}),
        store.Event(start + 3599, "Q2", "accepted", ("q2",), {}),
        store.Event(start + 3600, "", "refused", (), {}),
        store.Event(start + 3700, "Q3", "rejected", ("q3",), {}),
        store.Event(start + 2 * 3600 + 5, "Q1", "delivered", ("q1",), {}),
        store.Event(start + 5 * 3600, "Q9", "accepted", ("q9",), {}),  # after `until`
    ]
    store.append(conn, events)
    conn.close()
    buckets = query.traffic(tmp_path, start, start + 3 * 3600 - 1, step=3600)
    assert [(b["accepted"], b["refused"], b["delivered"]) for b in buckets] == [
        (2, 0, 0),
        (0, 2, 0),
        (0, 0, 1),
    ]
    assert query.traffic(tmp_path / "none", start, start + 3599) == [
        {"accepted": 0, "refused": 0, "delivered": 0, "deferred": 0, "bounced": 0}
    ]

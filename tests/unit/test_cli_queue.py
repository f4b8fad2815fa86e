"""`mailgate queue` through mailgate.cli.main, with a config and a spool in tmp_path."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailgate.cli import main
from mailgate.spool.api import NotFound
from mailgate.spool.entry import Attempt, Envelope, Recipient
from mailgate.spool.journal import JournalStore
from tests.support.spool import break_envelope

A = "0000000001AAAA"
B = "0000000002BBBB"
MISSING = "0000000009ZZZZ"
MESSAGE_A = b"From: alice@example.ac.uk\r\nSubject: report\r\n\r\nbody\r\n"
MESSAGE_B = b"Subject: bounce\r\n\r\nx\r\n"
T1 = datetime(2026, 3, 1, 12, 5, tzinfo=UTC)
T2 = datetime(2026, 3, 1, 12, 35, tzinfo=UTC)


@dataclass
class Queue:
    config: Path
    store: JournalStore
    now: datetime

    def run(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
        status = main(["-c", str(self.config), "queue", *argv])
        out, err = capsys.readouterr()
        return status, out, err


@pytest.fixture
def queue(tmp_path: Path) -> Queue:
    """A config and a spool; the test's store is another instance than the command's (another
    process, in real life)."""
    config = tmp_path / "mailgate.toml"
    config.write_text(
        'hostname = "mail.example.ac.uk"\n'
        '[spool]\npath = "spool"\n'
        '[smarthost]\nlisten = ["127.0.0.1:10025"]\n'
    )
    store = JournalStore(tmp_path / "spool")
    return Queue(config, store, datetime.now(UTC).replace(microsecond=0))


def fill(q: Queue) -> tuple[Envelope, Envelope]:
    """A: deferred after three tries for bob, delivered to carol. B: a fresh bounce."""
    history = (
        Attempt(T1, "deferred", "mx.example.org[127.0.0.2]", "451 4.7.1 greylisted"),
        Attempt(T2, "deferred", "mx.example.org[127.0.0.2]", "451 4.7.1 greylisted", tls=True),
        Attempt(T2, "delivered", "mx.example.com[127.0.0.3]", "250 2.0.0 ok"),
    )
    a = Envelope(
        id=A,
        mail_from="alice@example.ac.uk",
        recipients=(
            Recipient(
                "bob@example.org",
                attempts=3,
                next_attempt_at=q.now + timedelta(hours=1),
                last_reply="451 4.7.1 greylisted",
                history=history[:2],
            ),
            Recipient("carol@example.com", state="delivered", attempts=1, history=history[2:]),
        ),
        received_at=q.now - timedelta(hours=2),
        service="submission",
        login="alice",
        client="client.test [127.0.0.1]",
    )
    b = Envelope(
        id=B,
        mail_from="",
        recipients=(Recipient("dave@example.net"),),
        received_at=q.now - timedelta(seconds=90),
        is_bounce=True,
    )
    return q.store.enqueue(a, MESSAGE_A), q.store.enqueue(b, MESSAGE_B)


def test_list_of_an_empty_queue(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    assert queue.run(capsys, "list") == (0, "queue is empty\n", "")
    assert queue.run(capsys, "list", "--json") == (0, "[]\n", "")


def test_list_shows_one_line_per_entry(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    fill(queue)
    status, out, err = queue.run(capsys, "list")
    assert (status, err) == (0, "")
    assert out == (
        "ID              STATE      AGE       SIZE  TRIES  SENDER -> RECIPIENTS\n"
        "0000000001AAAA  deferred    2h         52      3  "
        "<alice@example.ac.uk> -> bob@example.org\n"
        "                last error: 451 4.7.1 greylisted\n"
        "0000000002BBBB  active      1m         22      0  <> -> dave@example.net\n"
        "-- 2 entries, 74 bytes\n"
    )


def test_list_json(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = fill(queue)
    status, out, err = queue.run(capsys, "list", "--json")
    assert (status, err) == (0, "")
    rows = json.loads(out)
    ages = [row.pop("age_seconds") for row in rows]
    assert 7200 <= ages[0] <= 7260 and 90 <= ages[1] <= 150
    assert rows == [
        {
            "id": A,
            "state": "deferred",
            "sender": "alice@example.ac.uk",
            "recipients": ["bob@example.org"],
            "size": 52,
            "received_at": a.received_at.isoformat(),
            "attempts": 3,
            "last_error": "451 4.7.1 greylisted",
        },
        {
            "id": B,
            "state": "active",
            "sender": "",
            "recipients": ["dave@example.net"],
            "size": 22,
            "received_at": b.received_at.isoformat(),
            "attempts": 0,
            "last_error": "",
        },
    ]


def test_show_prints_envelope_history_and_headers(
    queue: Queue, capsys: pytest.CaptureFixture[str]
) -> None:
    a, _ = fill(queue)
    status, out, err = queue.run(capsys, "show", A)
    assert (status, err) == (0, "")
    next_at = (queue.now + timedelta(hours=1)).isoformat()
    assert out == (
        f"id:           {A}\n"
        "state:        deferred\n"
        "sender:       <alice@example.ac.uk>\n"
        "size:         52\n"
        f"received at:  {a.received_at.isoformat()} (2h ago)\n"
        "service:      submission\n"
        "login:        alice\n"
        "client:       client.test [127.0.0.1]\n"
        "\n"
        "recipients:\n"
        f"  <bob@example.org>  pending  attempts=3  next={next_at}\n"
        "    last reply: 451 4.7.1 greylisted\n"
        "    2026-03-01T12:05:00+00:00 deferred mx.example.org[127.0.0.2]: 451 4.7.1 greylisted\n"
        "    2026-03-01T12:35:00+00:00 deferred mx.example.org[127.0.0.2] tls:"
        " 451 4.7.1 greylisted\n"
        "  <carol@example.com>  delivered  attempts=1  next=-\n"
        "    2026-03-01T12:35:00+00:00 delivered mx.example.com[127.0.0.3]: 250 2.0.0 ok\n"
        "\n"
        "headers:\n"
        "  From: alice@example.ac.uk\n"
        "  Subject: report\n"
    )


def test_show_json(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    _, b = fill(queue)
    status, out, err = queue.run(capsys, "show", B, "--json")
    assert (status, err) == (0, "")
    data = json.loads(out)
    assert data["id"] == B
    assert data["state"] == "active"
    assert data["headers"] == "Subject: bounce\r\n"
    assert data["envelope"] == json.loads(b.to_json())


def test_hold_and_release(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    fill(queue)
    before = queue.store.wakeup_mtime()
    assert queue.run(capsys, "hold", B) == (0, f"held {B}\n", "")
    assert queue.store.load(B).held
    assert queue.store.wakeup_mtime() > before
    _, out, _ = queue.run(capsys, "list")
    assert f"{B}  held        1m" in out
    assert queue.run(capsys, "release", B) == (0, f"released {B}\n", "")
    assert not queue.store.load(B).held


def test_flush_one_and_all(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    fill(queue)
    assert queue.run(capsys, "flush", A) == (0, f"flushed {A}\n", "")
    bob, carol = queue.store.load(A).recipients
    assert bob.next_attempt_at is not None and bob.next_attempt_at <= datetime.now(UTC)
    assert carol.next_attempt_at is None  # delivered recipients are left alone
    _, out, _ = queue.run(capsys, "list")
    assert f"{A}  active      2h" in out
    assert queue.run(capsys, "flush") == (0, "flushed 2 entries\n", "")


def test_delete(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    fill(queue)
    assert queue.run(capsys, "delete", A) == (0, f"deleted {A}\n", "")
    assert queue.store.ids() == [B]
    with pytest.raises(NotFound):
        queue.store.read_message(A)
    assert queue.run(capsys, "delete", A) == (1, "", f"mailgate: no such queue entry: {A}\n")


@pytest.mark.parametrize("action", ["show", "flush", "hold", "release", "delete"])
@pytest.mark.parametrize("qid", [MISSING, "../env/0000000001AAAA", "abc"])
def test_unknown_id_is_one_line_on_stderr_and_exit_1(
    queue: Queue, capsys: pytest.CaptureFixture[str], action: str, qid: str
) -> None:
    fill(queue)
    assert queue.run(capsys, action, qid) == (1, "", f"mailgate: no such queue entry: {qid}\n")


def test_unreadable_entry_is_reported_and_the_rest_listed(
    queue: Queue, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(queue)
    break_envelope(queue.store, A)
    status, out, err = queue.run(capsys, "list")
    assert status == 0
    assert err == f"mailgate: qid={A}: unreadable envelope (JSONDecodeError)\n"
    assert out.splitlines()[1].startswith(f"{B}  active")
    assert queue.run(capsys, "show", A) == (
        1,
        "",
        f"mailgate: qid={A}: unreadable envelope (JSONDecodeError)\n",
    )


def test_missing_spool_is_an_error_not_an_empty_queue(
    queue: Queue, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    queue.config.write_text(queue.config.read_text().replace('"spool"', '"nowhere"'))
    assert queue.run(capsys, "list") == (
        1,
        "",
        f"mailgate: spool.path: no spool at {tmp_path / 'nowhere'} (run `mailgate init`)\n",
    )
    assert not (tmp_path / "nowhere").exists()


def test_flush_leaves_a_delivered_entry_alone(
    queue: Queue, capsys: pytest.CaptureFixture[str]
) -> None:
    a, _ = fill(queue)
    done = replace(a.recipients[0], state="delivered")
    queue.store.update(A, lambda e: e.with_recipient(done))
    assert queue.run(capsys, "flush", A) == (0, f"flushed {A}\n", "")
    assert queue.store.load(A).recipients[0] == done

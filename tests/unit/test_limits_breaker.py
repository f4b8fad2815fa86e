"""suspend_account with the real SQLite directory and spool store in tmp_path."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from mailgate.directory.store import SqliteDirectory
from mailgate.errors import Rejected
from mailgate.limits import Limits, suspend_account
from mailgate.limits.breaker import Suspension
from mailgate.spool.api import SpoolStore
from mailgate.spool.entry import Envelope, Recipient, RecipientState
from mailgate.spool.journal import JournalStore
from tests.unit.test_limits import Clock, ratelimits, wall


@pytest.fixture
def directory(tmp_path: Path) -> Iterator[SqliteDirectory]:
    with SqliteDirectory(
        tmp_path / "state.db", default_domain="example.ac.uk", data_dir=tmp_path
    ) as d:
        d.add_user("alice", "alice@example.ac.uk", "correct horse battery")
        d.add_user("bob", "bob@example.ac.uk", "correct horse battery")
        yield d


def spool(store: SpoolStore, login: str, *states: str, held: bool = False) -> str:
    envelope = Envelope(
        id="",
        mail_from=f"{login}@example.ac.uk",
        recipients=tuple(
            Recipient(f"r{n}@example.org", state=cast(RecipientState, state))
            for n, state in enumerate(states)
        ),
        service="submission",
        login=login,
        held=held,
    )
    return store.enqueue(envelope, b"Subject: x\r\n\r\nbody\r\n").id


def test_suspends_the_login_and_holds_its_pending_mail(
    tmp_path: Path, directory: SqliteDirectory, caplog: pytest.LogCaptureFixture
) -> None:
    store = JournalStore(tmp_path / "spool")
    pending = spool(store, "alice", "pending", "delivered")
    pending_upper = spool(store, "Alice", "pending")
    already_held = spool(store, "alice", "pending", held=True)
    finished = spool(store, "alice", "delivered", "failed")
    bobs = spool(store, "bob", "pending")
    with caplog.at_level(logging.WARNING, logger="mailgate.limits.breaker"):
        result = suspend_account(directory, store, "alice", "recipients_per_hour=1001>1000")
    assert result == Suspension(
        login="alice",
        reason="recipients_per_hour=1001>1000",
        suspended=True,
        held=tuple(sorted([pending, pending_upper])),
    )
    alice = directory.get_user("alice")
    assert alice is not None and alice.suspended
    assert directory.verify_password("alice", "correct horse battery") is None
    bob = directory.get_user("bob")
    assert bob is not None and not bob.suspended
    assert [store.load(q).held for q in (pending, pending_upper, already_held, finished, bobs)] == [
        True,
        True,
        True,
        False,
        False,
    ]
    assert caplog.records[-1].levelno == logging.CRITICAL
    assert caplog.records[-1].getMessage() == (
        "ALERT account suspended login=alice reason=recipients_per_hour=1001>1000 "
        "suspended=yes held=2"
    )


def test_holds_mail_even_when_the_directory_refuses(
    tmp_path: Path, directory: SqliteDirectory, caplog: pytest.LogCaptureFixture
) -> None:
    store = JournalStore(tmp_path / "spool")
    qid = spool(store, "ghost", "pending")
    with caplog.at_level(logging.WARNING, logger="mailgate.limits.breaker"):
        result = suspend_account(directory, store, "ghost", "test")
    assert (result.suspended, result.held) == (False, (qid,))
    assert store.load(qid).held
    assert caplog.records[-1].getMessage() == (
        "ALERT account suspended login=ghost reason=test suspended=FAILED held=1"
    )


def test_entries_that_vanish_during_the_walk_are_skipped(
    tmp_path: Path, directory: SqliteDirectory
) -> None:
    store = JournalStore(tmp_path / "spool")
    gone = spool(store, "alice", "pending")
    kept = spool(store, "alice", "pending")

    class DeliveredMeanwhile(JournalStore):
        """The delivery engine removes `gone` between ids() and load()."""

        def ids(self) -> list[str]:
            qids = super().ids()
            self.remove(gone)
            return qids

    result = suspend_account(directory, DeliveredMeanwhile(tmp_path / "spool"), "alice", "x")
    assert result.held == (kept,)


def test_breaker_trip_to_suspension_end_to_end(tmp_path: Path, directory: SqliteDirectory) -> None:
    """What the session does: check, spool, record; on the one trip, suspend and hold."""
    store = JournalStore(tmp_path / "spool")
    limits = Limits(ratelimits(breaker_recipients_per_hour=5), now=Clock(), wall=wall)
    trips, refused = [], []
    for _ in range(4):
        try:
            limits.check_message(service="submission", login="alice", ip="192.0.2.1", nrcpt=2)
        except Rejected as e:
            refused.append(e.reply.line())
            continue
        spool(store, "alice", "pending", "pending")
        trip = limits.record_message(service="submission", login="alice", ip="192.0.2.1", nrcpt=2)
        if trip is not None:
            trips.append(trip)
            suspend_account(directory, store, trip.login, trip.reason)
    assert [t.reason for t in trips] == ["recipients_per_hour=6>5"]
    assert refused == ["450 4.7.1 Sending from this account is suspended, contact the postmaster"]
    assert [store.load(q).held for q in store.ids()] == [True, True, True]
    user = directory.get_user("alice")
    assert user is not None and user.suspended

"""The server's view of the directory (directory/cache.py) on both backends: answers from
memory, follows changes made by another process within the 10 s the contract allows (at once
on PostgreSQL, through NOTIFY), and keeps answering from its snapshot when the database goes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate.directory import User, open_url
from mailgate.directory.cache import DirectoryView
from mailgate.errors import DirectoryUnavailable
from tests.support.databases import closed_port_url, postgres_database
from tests.support.waiting import wait_for

DEFAULT = "example.org"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
        return
    with postgres_database() as pg:
        open_url(pg, default_domain=DEFAULT, data_dir=tmp_path, check=False).migrate()
        yield pg


def test_a_change_elsewhere_reaches_the_view(url: str, tmp_path: Path) -> None:
    writer = open_url(url, default_domain=DEFAULT, data_dir=tmp_path)  # another node's CLI
    writer.add_user("alice", "alice@example.org", "pw")
    view = DirectoryView(open_url(url, default_domain=DEFAULT, data_dir=tmp_path, check=False),
                         poll_interval=60.0 if "postgresql" in url else 2.0)  # fmt: skip
    view.start()
    try:
        assert view.get_user("ALICE") == User("alice", "alice@example.org")
        assert view.is_available
        writer.add_domain("dept.example.org")
        writer.grant("*@dept.example.org", "alice")
        # PostgreSQL: NOTIFY wakes the view although its poll interval is a minute.
        wait_for(lambda: view.may_send_as("alice", "Head@Dept.example.org"), timeout=10.0,
                 what="the view learning of the grant")  # fmt: skip
        assert view.is_managed("dept.example.org")
        writer.set_enabled("alice", False)
        wait_for(lambda: not view.get_user("alice").enabled, timeout=10.0)  # type: ignore[union-attr]
        writer.remove_user("alice")
        wait_for(lambda: view.get_user("alice") is None, timeout=10.0)
        assert not view.may_send_as("alice", "alice@example.org")
    finally:
        view.close()
        writer.close()


def test_an_unreachable_database_keeps_the_view_answering(tmp_path: Path) -> None:
    view = DirectoryView(open_url(closed_port_url(), default_domain=DEFAULT, data_dir=tmp_path,
                                  check=False), poll_interval=0.2)  # fmt: skip
    view.start()
    try:
        assert not view.is_available
        assert view.get_user("alice") is None
        assert view.is_managed("example.org")  # the default domain needs no database
        with pytest.raises(DirectoryUnavailable, match=r"cannot connect to the database$"):
            view.verify_password("alice", "pw")
    finally:
        view.close()

"""A full spool disk answers 452 4.3.1, keeps the server running, and loses nothing acknowledged.

The spool lives on a 2 MiB tmpfs mounted by the test (the tests run as root, as CI does).
"""

from __future__ import annotations

import os
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import message
from tests.support.gateway import Gateway


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)],
                   check=True, capture_output=True)  # fmt: skip
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """Write a filler file so that about `leave` bytes stay free."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    filler = disk / "filler"
    with filler.open("wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def smarthost_send(gw: Gateway, body: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", gw.ports["smarthost"], timeout=20) as c:
        c.ehlo("lab.test")
        c.mail("cron@lab.test")
        c.rcpt("ops@remote.test")
        return c.data(message(frm="cron@lab.test", body=body))


def test_full_spool_answers_452_and_recovers(tmp_path: Path, small_disk: Path) -> None:
    gw = Gateway(tmp_path / "gw", {"spool": {"path": str(small_disk / "spool")}})
    gw.start("--no-delivery")
    try:
        assert smarthost_send(gw, "before\r\n")[0] == 250
        filler = fill(small_disk, leave=16 * 1024)
        big = ("y" * 78 + "\r\n") * 5000  # ~400 KB: spills to spool/tmp while receiving
        code, text = smarthost_send(gw, big)
        assert (code, text[:5]) == (452, b"4.3.1"), text
        code, text = smarthost_send(gw, "small\r\n" * 4000)  # ~28 KB, fails at commit
        assert (code, text[:5]) == (452, b"4.3.1"), text
        assert len(gw.queued()) == 1  # nothing half-written was committed
        tmp = gw.spool / "tmp"
        assert not tmp.exists() or list(tmp.iterdir()) == []
        filler.unlink()
        assert smarthost_send(gw, "after\r\n")[0] == 250  # the server kept running
        assert len(gw.queued()) == 2
    finally:
        gw.finish()

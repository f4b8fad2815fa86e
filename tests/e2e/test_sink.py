"""`mailgate sink` (the demo's delivery target) saves what it receives, envelope first."""

from __future__ import annotations

import smtplib
import subprocess
import sys
from pathlib import Path

from tests.support.ports import free_port
from tests.support.waiting import wait_for


def test_sink_saves_each_transaction(tmp_path: Path) -> None:
    port = free_port()
    folder = tmp_path / "delivered"
    proc = subprocess.Popen([sys.executable, "-m", "mailgate", "sink", "--listen",
                             f"127.0.0.1:{port}", "--dir", str(folder)],
                            stderr=subprocess.PIPE)  # fmt: skip
    try:

        def connect() -> smtplib.SMTP | None:
            try:
                return smtplib.SMTP("127.0.0.1", port, timeout=5)
            except OSError:
                return None

        client = wait_for(connect, timeout=15, what="the sink")
        client.ehlo("t.test")
        client.sendmail("a@b.test", ["c@d.test", "e@f.test"], b"Subject: x\r\n\r\n.dot\r\n")
        client.quit()
        [saved] = list(folder.iterdir())
        assert saved.read_bytes() == (
            b"X-Sink-Envelope: from=<a@b.test> to=<c@d.test>,<e@f.test>\r\n"
            b"Subject: x\r\n\r\n.dot\r\n"
        )
    finally:
        proc.terminate()
        proc.wait(timeout=10)

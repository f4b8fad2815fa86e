"""Type=notify: `mailgate serve` tells systemd READY=1 once every listener is bound.

A datagram socket stands in for systemd's $NOTIFY_SOCKET. The READY=1 datagram must come
only when every port already accepts connections, whether one process serves or several
workers do, and STOPPING=1 when it stops.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.gateway import Gateway
from tests.support.ports import accepts

pytestmark = pytest.mark.e2e


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    folder = Path(tempfile.mkdtemp(prefix="mg-notify-"))  # short: AF_UNIX paths are 108 bytes
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(folder / "notify"))
    sock.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(folder / "notify"))
    try:
        yield sock
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_ready_once_every_listener_is_bound(tmp_path: Path, notify_socket: socket.socket,
                                            workers: int) -> None:  # fmt: skip
    gw = Gateway(tmp_path / "gw", overrides={"server": {"workers": workers}})
    with gw.log_path.open("ab") as log:  # not gw.start(): that waits for the ports itself
        gw.proc = subprocess.Popen(
            [sys.executable, "-m", "mailgate", "-c", str(gw.config), "serve", "--no-delivery"],
            stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
    try:
        assert notify_socket.recv(4096) == b"READY=1"
        # At that moment, and not later, every port takes connections.
        ports = gw.ports.values()
        assert {p: accepts(p, timeout=5) for p in ports} == dict.fromkeys(ports, True)
        gw.stop()
        assert notify_socket.recv(4096) == b"STOPPING=1"
    finally:
        gw.finish()

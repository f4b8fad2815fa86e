"""Several listener processes: steering by client address, restart, one server per port/spool."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

from tests.e2e.conftest import message
from tests.e2e.test_attacks import connect
from tests.support.gateway import Gateway, toml_dumps
from tests.support.ports import free_port
from tests.support.processes import start_logged
from tests.support.waiting import wait_for


def send_from(gw: Gateway, source_ip: str, service: str = "smarthost") -> None:
    sock = socket.create_connection(("127.0.0.1", gw.ports[service]), timeout=10,
                                    source_address=(source_ip, 0))  # fmt: skip
    client = smtplib.SMTP(timeout=10)
    client.sock = sock
    assert client.getreply()[0] == 220
    client.ehlo("lab.test")
    if service == "smarthost":
        client.sendmail("cron@lab.test", ["ops@remote.test"], message(frm="cron@lab.test"))
    client.quit()


def listening(log: str, service: str) -> set[str]:
    return set(re.findall(rf"mailgate\[(\d+)\] \S+: listening service={service} ", log))


def worker_of(log: str, ip: str, service: str = "smarthost") -> set[str]:
    return set(re.findall(rf"mailgate\[(\d+)\] \S+: sid=\w+ connect service={service} "
                          rf"client=\[{re.escape(ip)}\]", log))  # fmt: skip


def test_each_client_address_sticks_to_one_worker_on_submission(tmp_path: Path) -> None:
    gw = Gateway(tmp_path / "gw", {"server": {"workers": 2}})
    gw.start("--no-delivery")
    try:
        # Until the second worker has joined the port's group, the kernel cannot steer to it.
        wait_for(lambda: len(listening(gw.log_text(), "submission")) == 2, timeout=15,
                 what="both workers listening")  # fmt: skip
        for _ in range(6):
            send_from(gw, "127.0.0.10", "submission")
            send_from(gw, "127.0.0.11", "submission")
        log = gw.log_text()
        ten = worker_of(log, "127.0.0.10", "submission")
        eleven = worker_of(log, "127.0.0.11", "submission")
        assert len(ten) == 1 and len(eleven) == 1, (ten, eleven)
        assert ten != eleven  # 10 and 11 differ mod 2: the two workers share the load
    finally:
        gw.stop()


def test_one_smarthost_client_uses_every_worker(tmp_path: Path) -> None:
    gw = Gateway(tmp_path / "gw", {"server": {"workers": 2}})
    gw.start("--no-delivery")
    try:
        # Until the second worker has joined the port's group, the kernel cannot pick it.
        wait_for(lambda: len(listening(gw.log_text(), "smarthost")) == 2, timeout=15,
                 what="both workers listening")  # fmt: skip
        for _ in range(30):  # the kernel hashes the 4-tuple: 2**-29 that one worker gets all
            send_from(gw, "127.0.0.10")
        assert len(worker_of(gw.log_text(), "127.0.0.10")) == 2
        assert len(gw.queued()) == 30
    finally:
        gw.stop()


def test_a_dead_worker_is_replaced(tmp_path: Path) -> None:
    gw = Gateway(tmp_path / "gw", {"server": {"workers": 2}})
    gw.start("--no-delivery")
    try:
        assert gw.proc is not None
        workers = gw.pids() - {gw.proc.pid}
        assert len(workers) == 2
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(gw.pids() - {victim}) == 3, timeout=15, what="a new worker")
        for ip in ("127.0.0.10", "127.0.0.11"):
            send_from(gw, ip)
        assert len(gw.queued()) == 2
        assert "worker died" in gw.log_text()
    finally:
        gw.stop()


def test_second_server_on_the_same_ports_or_spool_is_refused(tmp_path: Path) -> None:
    gw = Gateway(tmp_path / "gw")
    gw.start("--no-delivery")
    try:
        proc = subprocess.run([sys.executable, "-m", "mailgate", "-c", str(gw.config), "serve"],
                              capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
        assert proc.returncode == 1
        assert proc.stderr.strip().endswith("Address already in use"), proc.stderr
        assert "mailgate: submission.listen: cannot listen on 127.0.0.1:" in proc.stderr
        # Other ports, same spool: refused too (recovery would empty the running server's tmp/).
        other = dict(gw.settings)
        for service in ("submission", "submissions", "smarthost"):
            other[service] = {**gw.settings[service], "listen": [f"127.0.0.1:{free_port()}"]}
        other["spool"] = {"path": str(gw.spool)}
        config = gw.root / "other.toml"
        config.write_text(toml_dumps(other))
        proc = subprocess.run([sys.executable, "-m", "mailgate", "-c", str(config), "serve"],
                              capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines()[-1] == (
            f"mailgate: spool.path: another mailgate serve uses {gw.spool}"
        )
    finally:
        gw.stop()


def test_workers_exit_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    gw = Gateway(tmp_path / "gw", {"server": {"workers": 2}})
    gw.start("--no-delivery")
    assert gw.proc is not None
    workers = gw.pids() - {gw.proc.pid}
    os.kill(gw.proc.pid, signal.SIGKILL)
    gw.proc.wait(timeout=10)

    def gone() -> bool:
        for pid in workers:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            return False
        return True

    wait_for(gone, timeout=30, what="workers to exit")
    gw.proc = None


def test_a_client_address_reaches_the_same_worker_on_587_and_465(tmp_path: Path) -> None:
    """Socket i of every steered group is worker i's, whichever worker is ready first: an AUTH
    lock-out earned on 465 (counted in one worker's memory) holds on 587. Worker 0 is held
    stopped before it binds, so a worker 1 that binds at once joins every group first."""
    gw = Gateway(tmp_path / "gw", {"server": {"workers": 2}})
    env = dict(os.environ, MAILGATE_LOG_LEVEL="INFO", PYTHONUNBUFFERED="1")
    gw.proc = start_logged([sys.executable, "-m", "mailgate", "-c", str(gw.config), "serve",
                            "--no-delivery"], gw.log_path, env)  # fmt: skip
    try:
        pids = wait_for(lambda: worker_pids(gw.log_text(), 2), timeout=20, what="two workers")
        os.kill(pids[0], signal.SIGSTOP)
        try:
            # worker 1 has either bound (worker 0 would join the groups second) or is waiting
            wait_for(lambda: listening(gw.log_text(), "submission") or
                     "worker 1: waiting for worker 0 to bind" in gw.log_text(),
                     timeout=20, what="worker 1 to bind or wait")  # fmt: skip
        finally:
            os.kill(pids[0], signal.SIGCONT)
        wait_for(lambda: len(listening(gw.log_text(), "submissions")) == 2, timeout=20,
                 what="both workers listening")  # fmt: skip
        addresses = [f"127.0.0.{n}" for n in range(2, 8)]
        for ip in addresses:
            with connect(gw.ports["submission"], source=ip) as c:
                assert c.cmd(b"EHLO lab.test").startswith(b"250-")
            with connect(gw.ports["submissions"], source=ip, tls=True) as c:
                assert c.cmd(b"EHLO lab.test").startswith(b"250-")

        def reached() -> dict[str, tuple[set[str], set[str]]]:
            log = gw.log_text()
            return {ip: (worker_of(log, ip, "submission"), worker_of(log, ip, "submissions"))
                    for ip in addresses}  # fmt: skip

        wait_for(lambda: all(a and b for a, b in reached().values()), timeout=10,
                 what="every session logged")  # fmt: skip
        expected = {ip: ({str(pids[int(ip.rsplit(".", 1)[1]) % 2])},) * 2 for ip in addresses}
        assert reached() == expected
    finally:
        gw.stop()


def worker_pids(log: str, workers: int) -> list[int] | None:
    """The pid of each worker index, once every one has been started."""
    found = dict(re.findall(r"worker started index=(\d+) pid=(\d+)", log))
    if len(found) < workers:
        return None
    return [int(found[str(i)]) for i in range(workers)]

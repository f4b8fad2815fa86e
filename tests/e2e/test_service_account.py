"""`[server] user`: `mailgate serve` started as root runs as the service account.

Started as root with `[server] user = "nobody"` (made by `mailgate init --user nobody`), on a
submission port below 1024: every process that holds a client's socket runs as nobody with no
capability left (read from /proc/PID/status, every thread), the supervisor keeps only
CAP_NET_BIND_SERVICE, and what the server wrote (spool, database, keys) belongs to nobody and
is readable by nobody else. Administrative commands started as root run as nobody too.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import smtplib
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import ALICE, client_tls, message, submission, submissions
from tests.support.gateway import Gateway
from tests.support.ports import free_privileged_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="starts mailgate as root (CI runs as root)"),
]

SERVICE_USER = "nobody"
CAP_NET_BIND_SERVICE = 1 << 10


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    # Not under tmp_path: pytest's folders are 0700 root, which the service account cannot enter.
    top = Path(tempfile.mkdtemp(prefix="mailgate-account-"))
    top.chmod(0o755)
    try:
        gw = Gateway(top / "gw", overrides={"server": {"user": SERVICE_USER, "workers": 2}},
                     init_args=("--user", SERVICE_USER))  # fmt: skip
        low = free_privileged_port()
        gw.ports["submission"] = low
        gw.settings["submission"]["listen"] = [f"127.0.0.1:{low}"]
        gw.write_config()
        gw.add_user(*ALICE)  # run as root: the command switches to nobody itself
        gw.start("--no-delivery")
        try:
            yield gw
        finally:
            gw.finish()
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _status(path: Path) -> dict[str, list[str]]:
    fields = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return fields


def _established_inodes(ports: set[int]) -> set[str]:
    """Socket inodes of established TCP connections to one of `ports` (the server's side)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                local_port = int(cols[1].rsplit(":", 1)[1], 16)
                if local_port in ports and cols[3] == "01":  # TCP_ESTABLISHED
                    inodes.add(cols[9])
    return inodes


def _socket_holders(pids: set[int], inodes: set[str]) -> dict[int, set[str]]:
    held: dict[int, set[str]] = {}
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            inode = target.removeprefix("socket:[").removesuffix("]")
            if target.startswith("socket:[") and inode in inodes:
                held.setdefault(pid, set()).add(inode)
    return held


def _owned_by_the_account_only(path: Path, uid: int) -> None:
    st = path.lstat()
    assert st.st_uid == uid, f"{path} belongs to uid {st.st_uid}"
    assert stat.S_IMODE(st.st_mode) & 0o077 == 0, f"{path} mode {stat.S_IMODE(st.st_mode):o}"
    assert stat.S_IMODE(st.st_mode) & 0o400, f"{path} not readable by its owner"


def test_every_process_holding_a_client_socket_runs_as_the_service_account(
    gateway: Gateway,
) -> None:
    account = pwd.getpwnam(SERVICE_USER)
    uid, gid = str(account.pw_uid), str(account.pw_gid)
    clients: list[smtplib.SMTP] = [submission(gateway), submission(gateway),
                                   submissions(gateway)]  # fmt: skip
    smarthost = smtplib.SMTP("127.0.0.1", gateway.ports["smarthost"], timeout=10)
    smarthost.ehlo("client.test")
    clients.append(smarthost)
    try:
        refused = clients[0].sendmail("alice@example.org", ["someone@remote.test"], message())
        assert refused == {}
        inodes = _established_inodes(set(gateway.ports.values()))
        assert len(inodes) == len(clients)
        pids = gateway.pids()
        held = _socket_holders(pids, inodes)
        # Every client connection is held by some mailgate process, and each of those is nobody
        # in every thread, with no capability at all.
        assert set().union(*held.values()) == inodes
        for pid in held:
            for task in Path(f"/proc/{pid}/task").iterdir():
                status = _status(task / "status")
                assert status["Uid"] == [uid] * 4, (pid, task.name, status["Uid"])
                assert status["Gid"] == [gid] * 4, (pid, task.name, status["Gid"])
                for caps in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
                    assert int(status[caps][0], 16) == 0, (pid, task.name, caps)
        # The supervisor (no client socket) is nobody too, holding only the capability to
        # bind the low submission port for a worker it restarts.
        assert gateway.proc is not None
        supervisor = _status(Path(f"/proc/{gateway.proc.pid}/status"))
        assert gateway.proc.pid not in held
        assert supervisor["Uid"] == [uid] * 4
        assert int(supervisor["CapEff"][0], 16) == CAP_NET_BIND_SERVICE
        assert int(supervisor["CapPrm"][0], 16) == CAP_NET_BIND_SERVICE
    finally:
        for client in clients:
            client.quit()
    log = gateway.log_text()
    assert f"running as user={SERVICE_USER} uid={uid}" in log
    assert "keep_bind=yes" in log

    # What the server and the commands wrote belongs to nobody and is readable by it alone.
    root = gateway.root
    spool = [gateway.spool, *gateway.spool.rglob("*")]
    assert any(p.parent.name == "journal" for p in spool), spool  # the message is in there
    for path in spool:
        _owned_by_the_account_only(path, account.pw_uid)
    for path in [root / "state.db", *root.glob("state.db-*"), root / "tls" / "key.pem",
                 root / "tls"]:  # fmt: skip
        _owned_by_the_account_only(path, account.pw_uid)
    assert grp.getgrgid((root / "state.db").stat().st_gid).gr_gid == account.pw_gid

    # An administrative command started as root runs as nobody: it reads the spool, and the
    # journal record it appends belongs to nobody.
    (qid,) = gateway.queued()
    assert gateway.cli("queue", "hold", qid).stdout == f"held {qid}\n"
    for path in gateway.spool.rglob("*"):
        _owned_by_the_account_only(path, account.pw_uid)


def test_a_spool_the_account_cannot_write_stops_the_start_with_one_line(
    gateway: Gateway,
) -> None:
    gateway.stop()
    os.chown(gateway.spool, 0, 0)
    proc = gateway.cli("serve", check=False)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (
        f"mailgate: spool.path: folder {gateway.spool} is not writable: Permission denied "
        f"(as user {SERVICE_USER})"
    )


def test_the_tls_handshake_works_as_the_service_account(gateway: Gateway) -> None:
    """The workers read the key as nobody (and again when it changes): init gave it to them."""
    with smtplib.SMTP_SSL("127.0.0.1", gateway.ports["submissions"], timeout=10,
                          context=client_tls()) as client:  # fmt: skip
        assert client.ehlo("client.test")[0] == 250
        assert client.login(*ALICE)[0] == 235

"""HAProxy (the Debian package, started here) in front of two nodes with PROXY v2: the nodes
see the real client address (Received:, the smart host's network check), and a PROXY header
from outside proxy_networks is refused. Loopback addresses stand for the machines: the client
is 127.0.0.3, HAProxy connects to the nodes from 127.0.0.2 (their proxy_networks)."""

from __future__ import annotations

import contextlib
import shutil
import smtplib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate.receive.proxy import build_v2
from tests.e2e.conftest import message
from tests.support.gateway import Gateway, started
from tests.support.ports import accepts, free_port
from tests.support.waiting import wait_for

CLIENT = "127.0.0.3"
BALANCER = "127.0.0.2"


def node(root: Path) -> Gateway:
    proxied = {"proxy_networks": [f"{BALANCER}/32"]}
    return Gateway(root, {"smarthost": {**proxied, "networks": [f"{CLIENT}/32"]},
                          "submission": proxied, "server": {"workers": 1}})  # fmt: skip


@contextlib.contextmanager
def haproxy(tmp_path: Path, port: int, backends: list[int]) -> Iterator[subprocess.Popen[bytes]]:
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    servers = "\n".join(
        f"    server n{i} 127.0.0.1:{p} send-proxy-v2 source {BALANCER}"
        for i, p in enumerate(backends)
    )
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"""global
    maxconn 100
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend smtp
    bind 127.0.0.1:{port}
    default_backend nodes
backend nodes
    balance roundrobin
{servers}
""")
    proc = subprocess.Popen([binary, "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL,
                            stderr=(tmp_path / "haproxy.log").open("wb"))  # fmt: skip
    try:
        wait_for(lambda: accepts(port), timeout=10.0, what="haproxy listening")
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[Gateway, Gateway]]:
    a, b = node(tmp_path / "a"), node(tmp_path / "b")
    with started(a, b):
        yield a, b


def test_nodes_behind_haproxy_see_the_real_client(
    tmp_path: Path, nodes: tuple[Gateway, Gateway]
) -> None:
    a, b = nodes
    port = free_port()
    with haproxy(tmp_path, port, [a.ports["smarthost"], b.ports["smarthost"]]):
        for _ in range(4):  # round robin: messages through both nodes
            with smtplib.SMTP("127.0.0.1", port, timeout=10,
                              source_address=(CLIENT, 0)) as client:  # fmt: skip
                client.ehlo("printer.test")
                assert client.sendmail("printer@lab.test", ["x@remote.test"],
                                       message(frm="printer@lab.test")) == {}  # fmt: skip
        # A client outside smarthost.networks is refused, though HAProxy (127.0.0.2) relays it.
        with smtplib.SMTP("127.0.0.1", port, timeout=10,
                          source_address=("127.0.0.4", 0)) as client:  # fmt: skip
            client.ehlo("stranger.test")
            assert client.docmd("MAIL", "FROM:<x@lab.test>")[0] == 250
            assert client.docmd("RCPT", "TO:<x@remote.test>") == (550, b"5.7.1 Relaying denied")
    queued = {gw: gw.queued() for gw in (a, b)}
    assert sorted(len(ids) for ids in queued.values()) == [2, 2], queued
    for gw, ids in queued.items():
        for qid in ids:
            received = gw.message(qid).split(b"\r\n", 1)[0]
            assert received == f"Received: from printer.test ([{CLIENT}])".encode(), received


def test_a_proxy_header_from_outside_proxy_networks_is_refused(
    nodes: tuple[Gateway, Gateway],
) -> None:
    a, _ = nodes
    with socket.create_connection(("127.0.0.1", a.ports["smarthost"]), 10,
                                  source_address=("127.0.0.4", 0)) as sock:  # fmt: skip
        sock.sendall(build_v2((CLIENT, 1234), ("127.0.0.1", 25)) + b"EHLO x\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    assert data.splitlines()[-1] == b"554 5.7.0 PROXY protocol header refused"
    assert "PROXY header from a peer outside proxy_networks" in a.log_text()
    assert a.queued() == []

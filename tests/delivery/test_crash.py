"""kill -9 of a delivering engine: nothing lost, nothing sent twice to an accepting recipient.

The engine runs in its own process (tests/delivery/engine_process.py) against the test DNS
server and recording sinks; the test kills it with SIGKILL and starts it again.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.delivery.conftest import Harness, SinkFactory, make_message, route
from tests.support.dnsserver import DnsServer
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]


class EngineProcess:
    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.proc: subprocess.Popen[str] | None = None

    def start(self, *, recover: bool = True) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.delivery.engine_process",
             str(self.harness.cfg.spool.path), self.harness.dns.nameserver, "1",
             "recover" if recover else "no-recover"],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "running"

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None


@pytest.fixture
def engine_process(harness: Harness) -> Iterator[EngineProcess]:
    process = EngineProcess(harness)
    yield process
    process.stop()


def test_kill_while_a_transaction_is_open(
    harness: Harness, dns: DnsServer, sinks: SinkFactory, engine_process: EngineProcess
) -> None:
    fast = sinks()
    slow = sinks(hold_end_of_data=True)  # never answers the final dot
    route(dns, "fast.test", fast)
    route(dns, "slow.test", slow)
    qids = [
        harness.enqueue(["a@fast.test", "b@slow.test"], message=make_message(f"m{n}"))
        for n in range(3)
    ]
    engine_process.start()
    # Every fast recipient delivered and recorded; the slow server holds one message open.
    wait_for(lambda: len(fast.accepted()) == 3, timeout=15)
    wait_for(
        lambda: all(harness.load(q).recipients[0].state == "delivered" for q in qids), timeout=15
    )
    wait_for(lambda: len(slow.transactions) == 1, timeout=15)
    engine_process.kill()

    slow.behaviour.hold_end_of_data = False
    engine_process.start()
    wait_for(lambda: harness.store.ids() == [], timeout=15)
    engine_process.stop()
    # Nothing twice for the server that accepted; nothing lost for the one that did not.
    assert len(fast.accepted()) == 3
    subjects = Counter(t.message.split(b"Subject: ")[1].split(b"\r\n")[0] for t in slow.accepted())
    assert subjects == Counter({b"m0": 1, b"m1": 1, b"m2": 1})


def test_kill_in_the_middle_of_a_burst_loses_nothing(
    harness: Harness, dns: DnsServer, sinks: SinkFactory, engine_process: EngineProcess
) -> None:
    dest = sinks()
    route(dns, "dest.test", dest)
    count = 200
    for n in range(count):
        harness.enqueue([f"r{n}@dest.test"], message=make_message(f"m{n}"))
    engine_process.start()
    wait_for(lambda: len(dest.accepted()) >= 10, timeout=15)
    engine_process.kill()
    assert len(harness.store.ids()) > 0  # killed mid-way indeed
    engine_process.start()
    wait_for(lambda: harness.store.ids() == [], timeout=15)
    engine_process.stop()
    got = Counter(t.rcpt_to[0] for t in dest.accepted())
    assert set(got) == {f"r{n}@dest.test" for n in range(count)}
    # One connection (max_per_destination 1): at most the one message whose 250 was in flight
    # when the process died can arrive twice (RFC 1047); a recorded one never does.
    assert sum(got.values()) - count <= 1


def test_kill_between_delivery_and_removal_delivers_again(
    harness: Harness, dns: DnsServer, sinks: SinkFactory, engine_process: EngineProcess
) -> None:
    """The removal of a delivered entry goes to the journal after the server's 250 (on the
    engine's spool thread, batched): a crash in between must deliver it again, never lose it."""
    dest = sinks()
    route(dns, "dest.test", dest)
    qid = harness.enqueue(["r@dest.test"], message=make_message("m"))
    # Our shared lock lets the engine read the journal but not append to it: the delivery
    # happens, its removal cannot be written.
    lock = os.open(harness.cfg.spool.path / "journal.lock", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(lock, fcntl.LOCK_SH)
        engine_process.start(recover=False)
        wait_for(lambda: len(dest.accepted()) == 1, timeout=15)
        engine_process.kill()
    finally:
        os.close(lock)
    assert harness.store.ids() == [qid]  # delivered, not removed

    engine_process.start()
    wait_for(lambda: harness.store.ids() == [], timeout=15)
    engine_process.stop()
    assert [t.rcpt_to for t in dest.accepted()] == [("r@dest.test",), ("r@dest.test",)]

"""An unexpected exception is 451 4.3.0 for that session only, with the details in the log only.

The server runs in this process (receive.serve.Listeners on a loopback port) so that a scanner
and a policy that fail on demand can be wired in; the client is smtplib in a thread.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import smtplib
from pathlib import Path

import pytest

from mailgate import config
from mailgate.accept import Acceptor
from mailgate.auth.authenticator import Authenticator
from mailgate.auth.directory import DirectoryBackend
from mailgate.message.headers import HeaderSection
from mailgate.policy import Policy, Sender
from mailgate.receive.serve import Listeners
from mailgate.receive.session import Services
from mailgate.scan import Verdict
from mailgate.spool.group import GroupCommitter
from mailgate.spool.journal import JournalStore
from tests.support.memdir import MemoryDirectory
from tests.support.ports import free_port


class FailingScanner:
    def __init__(self) -> None:
        self.fail = True

    async def check(
        self, message: object, log_prefix: str = "", section: HeaderSection | None = None
    ) -> Verdict:
        if self.fail:
            raise RuntimeError("scanner exploded: secret detail")
        return Verdict(header="test ; clean")


class FailingPolicy(Policy):
    def check_sender(self, sender: Sender, address: str) -> str:
        if address == "boom@lab.test":
            raise KeyError("policy exploded")
        return super().check_sender(sender, address)


def send(port: int) -> list[tuple[int, bytes]]:
    out = []
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.ehlo("lab.test")
        out.append(c.docmd("MAIL", "FROM:<boom@lab.test>"))
        c.rset()
        c.mail("cron@lab.test")
        c.rcpt("ops@remote.test")
        out.append(c.data(b"Subject: one\r\n\r\nbody\r\n"))
        c.mail("cron@lab.test")
        c.rcpt("ops@remote.test")
        out.append(c.data(b"Subject: two\r\n\r\nbody\r\n"))
    return out


def test_exceptions_become_451_430_and_the_session_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    cfg = config.parse(f'[smarthost]\nlisten = ["127.0.0.1:{port}"]\nnetworks = ["127.0.0.0/8"]\n',
                       tmp_path / "mailgate.toml")  # fmt: skip
    directory = MemoryDirectory()
    store = JournalStore(tmp_path / "spool")
    policy = FailingPolicy(directory, smarthost_networks=[ipaddress.ip_network("127.0.0.0/8")])
    scanner = FailingScanner()

    async def main() -> list[tuple[int, bytes]]:
        acceptor = Acceptor(hostname="mail.test", policy=policy, committer=GroupCommitter(store),
                            scanner=scanner, signer=None, hop_limit=50)  # fmt: skip
        authenticator = Authenticator(DirectoryBackend(directory), directory)
        services = Services(cfg=cfg, store=store, policy=policy, acceptor=acceptor,
                            directory=directory, authenticator=authenticator,
                            tls=None)  # fmt: skip
        listeners = Listeners(services)
        await listeners.start()
        try:
            first = await asyncio.to_thread(send, port)
            scanner.fail = False
            second = await asyncio.to_thread(send, port)
        finally:
            await listeners.stop(grace=1)
        return first + second

    with caplog.at_level(logging.INFO):
        replies = asyncio.run(main())
    assert [(code, text[:5]) for code, text in replies[:3]] == [(451, b"4.3.0")] * 3
    assert all(b"exploded" not in text for _, text in replies)  # details stay in the log
    assert (replies[4][0], replies[5][0]) == (250, 250)  # the server kept working
    assert "scanner exploded: secret detail" in caplog.text
    assert len(store.ids()) == 2

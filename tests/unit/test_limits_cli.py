"""`mailgate limits report`: the snapshot written by the server, read back by the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import pytest

import mailgate.cli
from mailgate.cli import limits as limits_cli
from mailgate.config import ServiceRateLimits
from mailgate.errors import Rejected
from mailgate.limits import AuthGuard, Limits, snapshot_path
from tests.unit.test_limits import WALL, Clock, ratelimits, wall

Main = Callable[[Sequence[str]], int]


@pytest.fixture
def main(monkeypatch: pytest.MonkeyPatch) -> Main:
    """mailgate.cli.main with the limits command registered (cli/__init__.py registers it
    once the receiving side's engineer adds it; until then the test adds it)."""
    if limits_cli not in mailgate.cli._MODULES:
        monkeypatch.setattr(mailgate.cli, "_MODULES", (*mailgate.cli._MODULES, limits_cli))
    return mailgate.cli.main


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "mailgate.toml"
    path.write_text(
        'hostname = "mail.test"\n[spool]\npath = "spool"\n'
        '[smarthost]\nlisten = ["127.0.0.1:10025"]\n'
    )
    (tmp_path / "spool").mkdir()
    return path


def busy_server_snapshot() -> dict[str, object]:
    """What `serve` would write after some traffic, built with the real Limits and AuthGuard."""
    clock = Clock()
    cfg = ratelimits(
        login_recipients_per_hour=10,
        ip_messages_per_hour=100,
        shadow=("ip_messages_per_hour",),
        breaker_recipients_per_hour=12,
        smarthost=ServiceRateLimits(ip_messages_per_hour=1000, shadow=()),
    )
    limits = Limits(cfg, now=clock, wall=wall)
    for login, nrcpt in (("alice", 9), ("bob", 2), ("bob", 3), ("carol\x1b[31m", 1)):
        limits.check_message(service="submission", login=login, ip="192.0.2.7", nrcpt=nrcpt)
        limits.record_message(service="submission", login=login, ip="192.0.2.7", nrcpt=nrcpt)
    with pytest.raises(Rejected, match="max=10 count=11"):
        limits.check_recipient(
            service="submission", login="alice", ip="192.0.2.7", rcpt_in_message=2
        )
    assert limits.record_message(service="submission", login="bob", ip="::1", nrcpt=8)
    guard = AuthGuard(cfg, now=clock)
    for n in range(4):
        guard.record_failure("203.0.113.5", f"user{n}")
    return {**limits.snapshot(), "auth": guard.snapshot()}


EXPECTED = """\
Rate limits snapshot of 2026-03-01T12:00:00+00:00 (75 s ago); counts over the last 3600 s, \
refusals since the server started.

service_messages_per_hour  submission=off submissions=off smarthost=off  refused=0 would_refuse=0
         5  submission
service_recipients_per_hour  submission=off submissions=off smarthost=off  refused=0 \
would_refuse=0
        23  submission
service_recipients_per_message  submission=off submissions=off smarthost=off  refused=0 \
would_refuse=0
login_messages_per_hour  submission=off submissions=off smarthost=off  refused=0 would_refuse=0
         3  bob
         1  alice
login_recipients_per_hour  submission=10 submissions=10 smarthost=10  refused=1 would_refuse=0
        13  bob
         9  alice
login_recipients_per_message  submission=off submissions=off smarthost=off  refused=0 \
would_refuse=0
ip_messages_per_hour  submission=100(shadow) submissions=100(shadow) smarthost=1000  refused=0 \
would_refuse=0
         4  192.0.2.0/24
         1  ::/64
ip_recipients_per_hour  submission=off submissions=off smarthost=off  refused=0 would_refuse=0
        15  192.0.2.0/24
         8  ::/64
ip_recipients_per_message  submission=off submissions=off smarthost=off  refused=0 \
would_refuse=0

breaker  recipients_per_hour=12 messages_per_hour=off refused=0
  2026-03-01T12:00:00+00:00  bob  recipients_per_hour=13>12  active

failed AUTH over the last 900 s
 clients:
         4  203.0.113.5  delayed
 logins:
         1  user0  counting
         1  user1  counting
"""


def test_format_report_text() -> None:
    text = limits_cli.format_report(busy_server_snapshot(), top=2, now=WALL + timedelta(seconds=75))
    assert text == EXPECTED


def test_report_reads_the_snapshot_in_the_spool(
    main: Main, conf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    snapshot = busy_server_snapshot()
    path = snapshot_path(conf.parent / "spool")
    assert path == conf.parent / "spool" / "limits.json"
    Limits(ratelimits(), wall=wall).write_snapshot(path, extra=snapshot)
    assert main(["-c", str(conf), "limits", "report", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == snapshot

    assert main(["-c", str(conf), "limits", "report", "--top", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Rate limits snapshot of 2026-03-01T12:00:00+00:00 (")
    assert out[1:] == EXPECTED.splitlines()[1:]
    # The login with an escape sequence is shown without it.
    assert main(["-c", str(conf), "limits", "report", "--top", "5"]) == 0
    assert "         1  carol?[31m" in capsys.readouterr().out.splitlines()


def test_report_without_snapshot(
    main: Main, conf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["-c", str(conf), "limits", "report"]) == 1
    path = conf.parent / "spool" / "limits.json"
    assert capsys.readouterr() == (
        "",
        f"mailgate: no rate-limit snapshot at {path} (mailgate serve writes one every 10 s)\n",
    )


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("{not json", "cannot read the snapshot: Expecting property name"),
        ('{"version": 2}', "cannot read the snapshot: "),
        ('{"version": 1, "written_at": "2026-03-01T12:00:00+00:00"}', "malformed snapshot"),
    ],
)
def test_report_with_a_bad_snapshot(
    main: Main, conf: Path, capsys: pytest.CaptureFixture[str], content: str, error: str
) -> None:
    (conf.parent / "spool" / "limits.json").write_text(content)
    assert main(["-c", str(conf), "limits", "report"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"mailgate: {conf.parent / 'spool' / 'limits.json'}: {error}")
    assert captured.err.count("\n") == 1

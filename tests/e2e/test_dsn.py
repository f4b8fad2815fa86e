"""RFC 3461 DSN end to end: the listener takes the parameters, the engine honours or passes them."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path

import pytest

from tests.e2e.conftest import message
from tests.support.gateway import Gateway
from tests.support.smtpsink import SmtpSink


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink(host="127.0.0.1", port=0) as s:
        yield s


@pytest.fixture
def gateway(tmp_path: Path, sink: SmtpSink) -> Iterator[Gateway]:
    gw = Gateway(tmp_path / "gw", {"delivery": {"relay": f"127.0.0.1:{sink.port}"}})
    gw.start()
    try:
        yield gw
    finally:
        gw.finish()


def send_with_dsn(gw: Gateway) -> None:
    with smtplib.SMTP("127.0.0.1", gw.ports["smarthost"], timeout=10) as c:
        c.ehlo("lab.test")
        assert c.has_extn("dsn")
        code, _ = c.mail("cron@lab.test", ["RET=HDRS", "ENVID=job+2B42"])
        assert code == 250
        code, _ = c.rcpt(
            "ops@remote.test", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;ops@remote.test"]
        )
        assert code == 250
        assert c.data(message(frm="cron@lab.test", body="secret body\r\n"))[0] == 250


def test_dsn_parameters_are_passed_to_a_next_hop_that_offers_dsn(
    gateway: Gateway, sink: SmtpSink
) -> None:
    sink.behaviour.dsn = True
    send_with_dsn(gateway)
    [t] = sink.wait_for(1, timeout=20)
    assert "RET=HDRS" in t.mail_params and "ENVID=job+2B42" in t.mail_params
    assert set(t.rcpt_params["ops@remote.test"]) >= {
        "NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;ops@remote.test"
    }  # fmt: skip


def test_success_notice_when_the_next_hop_has_no_dsn(gateway: Gateway, sink: SmtpSink) -> None:
    sink.behaviour.dsn = False
    send_with_dsn(gateway)
    original, notice = sink.wait_for(2, timeout=20)
    assert original.rcpt_to == ("ops@remote.test",)
    assert notice.mail_from == "" and notice.rcpt_to == ("cron@lab.test",)
    report = message_from_bytes(notice.message)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    text = notice.message.decode("utf-8", "replace")
    assert "Action: relayed" in text
    assert "Original-Envelope-Id: job+42\r\n" in text  # xtext-decoded (RFC 3461 §4.4)
    assert "secret body" not in text  # RET=HDRS: headers only


def test_failure_bounce_has_a_parseable_delivery_status(gateway: Gateway, sink: SmtpSink) -> None:
    sink.behaviour.rcpt_for["nobody@remote.test"] = "550 5.1.1 No such user"
    with smtplib.SMTP("127.0.0.1", gateway.ports["smarthost"], timeout=10) as c:
        c.sendmail("cron@lab.test", ["nobody@remote.test"], message(frm="cron@lab.test"))
    [bounce] = sink.wait_for(1, timeout=20)
    assert bounce.mail_from == "" and bounce.rcpt_to == ("cron@lab.test",)
    report = message_from_bytes(bounce.message)
    parts = {p.get_content_type(): p for p in report.walk()}
    status = parts["message/delivery-status"]
    fields = [f for block in status.get_payload() for f in block.items()]  # type: ignore[union-attr]
    as_dict = {k.lower(): v for k, v in fields}
    assert as_dict["action"] == "failed"
    assert as_dict["status"] == "5.1.1"
    assert "550" in as_dict["diagnostic-code"]
    assert as_dict["final-recipient"].lower() == "rfc822; nobody@remote.test"

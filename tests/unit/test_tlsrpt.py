"""TLS-RPT pieces without a network: the `_smtp._tls` record, result types, counting and the
report message round trip (RFC 8460 §3, §4, §5.3)."""

from __future__ import annotations

import email
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from mailgate.deliver.tlsrpt import Reporter, Session, parse_report, parse_rua, result_type
from mailgate.dnsresolver import make_async_resolver


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        (["v=TLSRPTv1; rua=mailto:a@example.net"], ["a@example.net"]),
        (["v=TLSRPTv1;rua=mailto:a@x.test,https://r.test/x, mailto:b@y.test?subject=x"],
         ["a@x.test", "b@y.test"]),
        (["v=TLSRPTv1; rua=https://r.test/only"], []),
        (["v=TLSRPTv1; rua=mailto:a@x.test", "v=TLSRPTv1; rua=mailto:b@x.test"], []),
        (["v=spf1 -all"], []),
    ],
)  # fmt: skip
def test_rua(records: list[str], expected: list[str]) -> None:
    assert parse_rua(records) == expected


@pytest.mark.parametrize(
    ("failure", "kind"),
    [
        ("no TLS (STARTTLS not offered or refused)", "starttls-not-supported"),
        ("x: certificate not accepted: leaf certificate has no matching subjectAltName",
         "certificate-host-mismatch"),
        ("cert is not valid at validation time", "certificate-expired"),
        ("self-signed certificate (not issued by a trusted CA)", "certificate-not-trusted"),
        ("no TLSA record matches the certificate chain", "validation-failure"),
        ("DANE for mx: TLSA _25._tcp.mx.: NoNameservers", "tlsa-invalid"),
        ("MX host mx2 is not in the policy", "validation-failure"),
    ],
)  # fmt: skip
def test_result_types(failure: str, kind: str) -> None:
    assert result_type(failure) == kind


def test_counting_survives_a_restart_and_reports_round_trip(tmp_path: Path) -> None:
    resolver = make_async_resolver([("127.0.0.1", 9)], 1.0)  # asked nothing here
    day = datetime(2024, 3, 1, 12, tzinfo=UTC)
    policy = ("version: STSv1", "mode: enforce", "mx: mx.d.test", "max_age: 60")
    first = Reporter(tmp_path, resolver, submitter="mail.example.org", contact="pm@e.org")
    first.record(Session("d.test", "sts", policy, "mx.d.test", "192.0.2.1"), day)
    first.record(Session("d.test", "sts", policy, "mx.d.test", "192.0.2.1",
                         "certificate-expired", "expired"), day)  # fmt: skip
    first.save()
    again = Reporter(tmp_path, resolver, submitter="mail.example.org", contact="pm@e.org")
    again.record(Session("d.test", "sts", policy, "mx.d.test", "192.0.2.1",
                         "certificate-expired", "expired"), day)  # fmt: skip
    again.save()
    assert again.finished_days(date(2024, 3, 1)) == []
    assert again.finished_days(date(2024, 3, 2)) == [date(2024, 3, 1)]
    counts = again._read(date(2024, 3, 1))
    [entry] = counts["domains"]["d.test"].values()
    report = again.build(date(2024, 3, 1), "d.test", counts["domains"]["d.test"])
    message = again.message(date(2024, 3, 1), "d.test", report, day)
    assert parse_report(message) == report
    assert entry["ok"] == 1 and entry["failed"] == 2
    [detail] = report["policies"][0]["failure-details"]
    assert detail["failed-session-count"] == 2 and detail["result-type"] == "certificate-expired"
    assert report["date-range"] == {
        "start-datetime": "2024-03-01T00:00:00Z", "end-datetime": "2024-03-01T23:59:59Z"
    }  # fmt: skip
    parsed = email.message_from_bytes(message)
    assert parsed["Subject"].startswith("Report Domain: d.test Submitter: mail.example.org ")
    again.forget(date(2024, 3, 1))
    assert again.finished_days(date(2024, 3, 2)) == []

"""MTA-STS pieces without a network: the TXT record, the policy parser, mx patterns, the cache
format (RFC 8461 §3.1, §3.2, §4.1)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mailgate.deliver.certs import name_matches
from mailgate.deliver.mtasts import Policy, PolicyError, parse_policy, parse_txt

NOW = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
        (["v=STSv1;id=abc"], "abc"),
        (["v=spf1 -all", "v=STSv1; id=x1"], "x1"),
        (["v=STSv1; id=a", "v=STSv1; id=b"], None),  # §3.1: several records: no policy
        (["v=STSv1;"], None),
        (["v=STSv1; id=not-alnum"], None),
        (["v=STSv1; id=" + "a" * 33], None),
        (["v=STSv2; id=a"], None),
        ([], None),
    ],
)
def test_txt_record(texts: list[str], expected: str | None) -> None:
    assert parse_txt(texts) == expected


def test_policy_parsed() -> None:
    text = ("version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.Example.net\r\n"
            "max_age: 86400\r\nfuture: ignored\r\n")  # fmt: skip
    policy = parse_policy(text, domain="example.com", policy_id="id1", fetched_at=NOW)
    assert policy == Policy("example.com", "id1", "enforce",
                            ("mail.example.com", "*.example.net"), 86400, NOW)  # fmt: skip
    assert policy.expires_at == NOW + timedelta(days=1)
    assert policy.allows("mail.example.com") and policy.allows("mx1.example.net")
    assert not policy.allows("a.b.example.net") and not policy.allows("example.net")
    assert Policy.from_json(policy.to_json()) == policy


def test_policy_with_lf_and_mode_none_without_mx() -> None:
    policy = parse_policy("version: STSv1\nmode: none\nmax_age: 0\n", domain="d",
                          policy_id="i", fetched_at=NOW)  # fmt: skip
    assert policy.mode == "none" and policy.mx == ()


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("mode: enforce\nmx: a\nmax_age: 1\n", "version"),
        ("version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n", "version"),
        ("version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n", "mode"),
        ("version: STSv1\nmode: enforce\nmx: a\nmax_age: 31557601\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a\nmax_age: -1\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmax_age: 10\n", "no mx"),
        ("version: STSv1\nmode: testing\nmx: bad host\nmax_age: 10\n", "mx"),
        ("version STSv1\n", "colon"),
    ],
)
def test_bad_policies(text: str, why: str) -> None:
    with pytest.raises(PolicyError, match=why):
        parse_policy(text, domain="d", policy_id="i", fetched_at=NOW)


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("mx.example.org", "MX.Example.org.", True),
        ("*.example.org", "mx.example.org", True),
        ("*.example.org", "example.org", False),
        ("*.example.org", "a.mx.example.org", False),
        ("*.example.org", ".example.org", False),
        ("mx.example.org", "mx2.example.org", False),
        ("", "mx.example.org", False),
    ],
)
def test_name_matching(pattern: str, name: str, matches: bool) -> None:
    assert name_matches(pattern, name) is matches

"""Smart host hygiene without sockets: the new configuration keys and the bad_nets rule.

`[smarthost] require_rdns`, `rdns_timeout`, `bad_nets` and `[limits] greeting_delay` are parsed
and validated like every other key (the error names the key); `policy.check_destination` and
`Policy.check_rcpt` refuse address literals inside the internal networks with 550 5.7.1.
The live behaviour (greeting delay, rDNS, bad_nets on the wire) is tested in
tests/e2e/test_abuse_limits.py.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from mailgate import config, replies
from mailgate.errors import ConfigError, Rejected
from mailgate.netaddr import parse_address
from mailgate.policy import Policy, Sender, check_destination, literal_address
from mailgate.receive.rdns import host_name
from tests.support.memdir import MemoryDirectory


def parse(text: str) -> config.Config:
    return config.parse(text, Path("/etc/mailgate/mailgate.toml"))


def test_defaults_change_nothing() -> None:
    cfg = parse("")
    assert cfg.smarthost.require_rdns is False
    assert cfg.smarthost.rdns_timeout == 5.0
    assert cfg.smarthost.bad_nets == ()
    assert cfg.limits.greeting_delay == 0.0


def test_keys_are_parsed() -> None:
    cfg = parse(
        '[smarthost]\nrequire_rdns = true\nrdns_timeout = 2\nbad_nets = ["10.0.0.0/8", "::1"]\n'
        "[limits]\ngreeting_delay = 1.5\n"
    )
    assert cfg.smarthost.require_rdns is True
    assert cfg.smarthost.rdns_timeout == 2.0
    assert cfg.smarthost.bad_nets == (
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"),
    )  # fmt: skip
    assert cfg.limits.greeting_delay == 1.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[smarthost]\nrequire_rdns = 1\n", "smarthost.require_rdns: expected true or false"),
        ('[smarthost]\nrequire_rdns = "yes"\n', "smarthost.require_rdns: expected true or false"),
        ("[smarthost]\nrdns_timeout = 0\n", "smarthost.rdns_timeout: expected a positive number"),
        ('[smarthost]\nbad_nets = ["intranet"]\n', "smarthost.bad_nets: 'intranet' is not an IP"),
        ('[smarthost]\nbad_nets = "10.0.0.0/8"\n', "smarthost.bad_nets: expected a list"),
        ("[limits]\ngreeting_delay = -1\n", "limits.greeting_delay: expected a number of seconds"),
        (
            "[limits]\ngreeting_delay = true\n",
            "limits.greeting_delay: expected a number of seconds",
        ),
    ],
)
def test_bad_values_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(text)
    assert str(e.value).startswith(message), str(e.value)


BAD_NETS = [ipaddress.ip_network(n) for n in ("127.0.0.0/8", "10.0.0.0/8", "fd00::/8", "::1/128")]


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("ops@[127.0.0.1]", True),
        ("ops@[10.255.0.1]", True),
        ("ops@[IPv6:::1]", True),
        ("ops@[ipv6:FD00::5]", True),  # the tag is case-insensitive (RFC 5321 §4.1.3)
        ("ops@[IPv6:::ffff:10.0.0.1]", True),  # IPv4-mapped counts as IPv4
        ("ops@[192.0.2.1]", False),
        ("ops@[IPv6:2001:db8::1]", False),
        ("ops@10.0.0.1", False),  # a name (even one that looks like an address) is not a literal
        ("ops@intranet.example.org", False),
        ("ops@[not-an-address]", False),
        ('"a@[10.0.0.1]"@example.org', False),  # the domain is what counts, not the local part
    ],
)
def test_check_destination(address: str, refused: bool) -> None:
    if refused:
        with pytest.raises(Rejected) as e:
            check_destination(address, BAD_NETS)
        assert e.value.reply == replies.RELAY_TO_INTERNAL_DENIED
        assert (e.value.reply.code, e.value.reply.status) == (550, "5.7.1")
    else:
        check_destination(address, BAD_NETS)
    check_destination(address, ())  # nothing configured: nothing refused


def test_literal_address() -> None:
    assert literal_address("a@[192.0.2.7]") == ipaddress.ip_address("192.0.2.7")
    assert literal_address("a@[IPv6:2001:db8::7]") == ipaddress.ip_address("2001:db8::7")
    assert literal_address("a@example.org") is None


def test_policy_check_rcpt_uses_internal_networks() -> None:
    policy = Policy(
        MemoryDirectory("example.org"),
        smarthost_networks=[ipaddress.ip_network("192.0.2.0/24")],
        internal_networks=BAD_NETS,
    )
    lab = Sender("smarthost", "192.0.2.10")
    policy.check_rcpt(lab, "ops@[198.51.100.1]")
    with pytest.raises(Rejected) as e:
        policy.check_rcpt(lab, "ops@[10.0.0.1]")
    assert e.value.reply == replies.RELAY_TO_INTERNAL_DENIED
    with pytest.raises(Rejected) as e:  # outside smarthost.networks: the relay rule comes first
        policy.check_rcpt(Sender("smarthost", "198.51.100.9"), "ops@[10.0.0.1]")
    assert e.value.reply == replies.RELAY_DENIED


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("Mail.Example.ORG.", "mail.example.org"),
        ("host-1.lab.example", "host-1.lab.example"),
        ("bad\\(name.example.", None),  # dnspython's escape of a non-LDH octet
        ("under_score.example", None),
        ("-leading.example", None),
        ("trailing-.example", None),
        ("a" * 64 + ".example", None),  # label over 63 octets
        ("", None),
        (".", None),
        ("mail.example.org\r\nX-Injected: 1", None),
    ],
)
def test_rdns_host_names_are_plain_ldh(text: str, name: str | None) -> None:
    assert host_name(text) == name


def test_rdns_client_address() -> None:
    assert parse_address("::ffff:192.0.2.1") == ipaddress.ip_address("192.0.2.1")
    assert parse_address("fe80::1%eth0") == ipaddress.ip_address("fe80::1")
    assert parse_address("unknown") is None

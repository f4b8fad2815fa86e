"""Property tests (a bounded fuzz run) for the headers mailgate writes and the addresses it reads.

What is fuzzed: `message.stamp` (Received:, Sender:, Message-ID:, X-Scanned-By:), the header
section parse (`message.headers`: refusing or reading every line, `without`, the body offset),
the strict From: reader (`message.authors`), the address literals that `policy.check_destination`
reads, and the host names `receive.rdns` lets into Received:. The properties are the ones an
attacker would try to break: whatever a client controls, each function writes exactly one header
field, every line ends in CRLF, nothing a client sends can start a new field, and removing a
field removes it and nothing else.

CI runs MAILGATE_FUZZ_EXAMPLES examples per property (100 by default, about five seconds in
total);
`scripts/fuzz` runs the same properties with many more (docs/SECURITY.md, "Fuzzing").
"""

from __future__ import annotations

import email.utils
import ipaddress
import os

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mailgate import replies
from mailgate.errors import ProtocolViolation, Rejected
from mailgate.message import headers, stamp
from mailgate.message.authors import read_authors
from mailgate.policy import check_destination, literal_address
from mailgate.receive.rdns import host_name
from mailgate.smtp import parse
from mailgate.values import Trace

FUZZ_EXAMPLES = int(os.environ.get("MAILGATE_FUZZ_EXAMPLES", "100"))
fuzz = settings(
    max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# Text a client controls: anything, with the characters that matter made likely.
NASTY = '\r\n\t\0 ():;<>\\"@[]\x0b\x0c\x85\u2028\u2029'
client_text = st.text(alphabet=st.sampled_from(NASTY) | st.characters(), max_size=60)
ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
LDH = "abcdefghijklmnopqrstuvwxyz0123456789"
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
hostnames = st.lists(labels, min_size=1, max_size=4).map(".".join)
locals_ = st.lists(st.text(alphabet=ATEXT, min_size=1, max_size=8), min_size=1, max_size=3).map(
    ".".join
)
addresses = st.builds(lambda local, domain: f"{local}@{domain}", locals_, hostnames)
ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6)


def one_field(data: bytes) -> tuple[str, str]:
    """Assert `data` is exactly one CRLF-terminated header field; return (name, value)."""
    assert data.endswith(b"\r\n")
    lines = data[:-2].split(b"\r\n")
    for i, raw in enumerate(lines):
        assert b"\r" not in raw and b"\n" not in raw and b"\0" not in raw, data
        # continuation lines start with white space (RFC 5322 §2.2.3); only the first has a name
        assert (i == 0) != (raw[:1] in (b" ", b"\t")), data
    fields = [(f.key, f.text()) for f in headers.parse(data).fields]
    assert len(fields) == 1, fields
    return fields[0]


def trace(**changes: object) -> Trace:
    base: dict[str, object] = {
        "client_helo": "client.test", "client_ip": "192.0.2.1", "client_name": "",
        "service": "submission", "port": 587, "with_keyword": "ESMTPSA",
        "tls": "TLSv1.3:TLS_AES_256_GCM_SHA384", "login": "alice", "mechanism": "PLAIN",
    }  # fmt: skip
    base.update(changes)
    return Trace(**base)  # type: ignore[arg-type]  # the keys above are Trace's fields


# --- Received: ------------------------------------------------------------------------------


@fuzz
@given(helo=client_text, login=st.none() | client_text, tls=client_text,
       rcpts=st.lists(client_text, max_size=3), ip=ipv4 | ipv6,
       name=st.just("") | hostnames)  # fmt: skip
def test_received_is_one_field_whatever_the_client_sent(
    helo: str, login: str | None, tls: str, rcpts: list[str],
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, name: str,
) -> None:  # fmt: skip
    t = trace(client_helo=helo, login=login, tls=tls, client_ip=str(ip), client_name=name)
    field, value = one_field(
        stamp.received(t, hostname="mail.example.org", qid="Q1", recipients=rcpts)
    )
    assert field == "received"
    assert value.startswith("from ")
    assert f"[{'IPv6:' if ip.version == 6 else ''}{ip}]" in value
    # Comments stay balanced (a client cannot close ours and open its own); the "for <path>"
    # is an angle-addr, where a quoted local part may hold parentheses, so it is left out.
    outside = value.replace(f"\tfor <{rcpts[0]}>;", "") if len(rcpts) == 1 else value
    assert outside.count("(") == outside.count(")")
    assert "by mail.example.org (mailgate submission port 587)" in value


@fuzz
@given(text=client_text)
def test_rdns_names_are_safe_for_the_received_comment(text: str) -> None:
    """Only what rdns.host_name returns reaches Trace.client_name."""
    name = host_name(text)
    if name is None:
        return
    assert name == name.lower() and len(name) <= 253
    assert set(name) <= set(LDH + ".-")
    _, value = one_field(
        stamp.received(trace(client_name=name), hostname="m.test", qid="Q", recipients=[])
    )
    assert f"({name} [192.0.2.1])" in value


@settings(max_examples=50, deadline=None)
@given(name=client_text)
def test_received_with_any_client_name_is_one_field(name: str) -> None:
    one_field(stamp.received(trace(client_name=name), hostname="m.test", qid="Q", recipients=[]))


# --- the other fields mailgate writes --------------------------------------------------------


@fuzz
@given(address=addresses)
def test_sender_header_round_trips(address: str) -> None:
    name, value = one_field(stamp.sender(address))
    assert name == "sender"
    assert email.utils.parseaddr(value)[1] == address


@fuzz
@given(text=client_text)
def test_scanned_by_is_one_field(text: str) -> None:
    name, _ = one_field(stamp.scanned_by(text))
    assert name == "x-scanned-by"


@fuzz
@given(hostname=hostnames, qid=st.text(alphabet=LDH.upper(), min_size=1, max_size=14))
def test_message_id_is_one_field_with_one_id(hostname: str, qid: str) -> None:
    name, value = one_field(stamp.message_id(hostname, qid))
    assert name == "message-id"
    assert value.startswith(f"<{qid}.") and value.endswith(f"@{hostname}>")
    assert value.count("<") == value.count(">") == 1


# --- reading and rewriting header blocks -----------------------------------------------------

NAMES = ["Received", "received", "Sender", "DKIM-Signature", "From", "X-Test", "Subject"]
values = st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]),
                 max_size=30)  # fmt: skip
fields = st.tuples(st.sampled_from(NAMES), st.lists(values, min_size=1, max_size=3))


def build_block(items: list[tuple[str, list[str]]]) -> bytes:
    """A header block; each value part after the first is folded onto its own line."""
    out = b""
    for name, parts in items:
        out += (name + ": " + "\r\n\t".join(p.strip() or "x" for p in parts)).encode() + b"\r\n"
    return out


@fuzz
@given(items=st.lists(fields, max_size=8), name=st.sampled_from(NAMES))
def test_without_removes_exactly_that_field(items: list[tuple[str, list[str]]], name: str) -> None:
    block = build_block(items)
    section = headers.parse(block + b"\r\nbody\r\n")
    trimmed = section.without(name)
    assert trimmed.fields == tuple(f for f in section.fields if f.key != name.lower())
    # The trimmed bytes parse back to the same fields, and the body is where it says.
    again = headers.parse(trimmed.raw + b"\r\nbody\r\n")
    assert again.fields == trimmed.fields
    assert (trimmed.raw + b"\r\nbody\r\n")[trimmed.body_offset :] == b"body\r\n"


@fuzz
@given(data=st.binary(max_size=300))
def test_parse_refuses_or_reads_every_line_as_a_field(data: bytes) -> None:
    """Garbage is refused (Rejected) or read completely: the fields give back the raw bytes."""
    try:
        section = headers.parse(data)
    except Rejected as e:
        assert e.reply.code in (552, 554), e.reply
        return
    assert b"".join(f.raw for f in section.fields) == section.raw
    assert data.startswith(section.raw) or section.raw == data + b"\r\n"


@fuzz
@given(items=st.lists(fields, min_size=1, max_size=6), body=st.binary(max_size=100))
def test_the_header_section_stops_at_the_first_empty_line(
    items: list[tuple[str, list[str]]], body: bytes
) -> None:
    block = build_block(items)
    section = headers.parse(block + b"\r\n" + body)
    assert section.raw == block and section.body_offset == len(block) + 2


def test_a_message_without_headers_has_an_empty_header_section() -> None:
    message = b"\r\nFrom: someone-else@example.org\r\n\r\nbody\r\n"
    section = headers.parse(message)
    assert section.fields == () and message[section.body_offset :].startswith(b"From:")
    assert read_authors(section) == ()


@fuzz
@given(display=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
       address=addresses)  # fmt: skip
def test_the_strict_reader_finds_the_from_address(display: str, address: str) -> None:
    local, _, domain = address.rpartition("@")
    assume("=?" not in display + address)  # an encoded word: refused, tested in test_authors
    header = f"From: {email.utils.formataddr((display, address))}\r\nSubject: x\r\n\r\nbody"
    (author,) = read_authors(headers.parse(header.encode()))
    assert [m.address for m in author.mailboxes] == [f"{local}@{domain.lower()}"]


# --- address literals and bad_nets ------------------------------------------------------------

EVERYWHERE = [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]


@fuzz
@given(ip=ipv4 | ipv6, local=locals_)
def test_every_parsed_literal_is_found_and_refused_by_a_catch_all_bad_nets(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, local: str
) -> None:
    literal = f"[{ip}]" if ip.version == 4 else f"[IPv6:{ip.compressed}]"
    address, rest = parse.parse_path(
        f"<{local}@{literal}>", allow_null=False, allow_postmaster=False, smtputf8=False
    )
    assert rest == ""
    found = literal_address(address)
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    assert found == (mapped or ip)
    with pytest.raises(Rejected) as e:
        check_destination(address, EVERYWHERE)
    assert e.value.reply == replies.RELAY_TO_INTERNAL_DENIED
    check_destination(address, [])  # no bad_nets: nothing is refused


@fuzz
@given(text=client_text)
def test_check_destination_on_any_rcpt_raises_only_rejected(text: str) -> None:
    try:
        address, _ = parse.parse_path(
            f"<{text}>", allow_null=False, allow_postmaster=False, smtputf8=True
        )
    except ProtocolViolation:
        address = text  # the policy must cope with what it is given, parsed or not
    try:
        check_destination(address, EVERYWHERE)
    except Rejected as e:
        assert e.reply == replies.RELAY_TO_INTERNAL_DENIED
        assert literal_address(address) is not None

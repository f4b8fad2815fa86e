"""The kernel ban filter (receive.kernelban), run on an interpreter of the classic-BPF subset it
uses, over real IPv4 and IPv6 headers: a packet is dropped exactly when its source is banned.
The same programs in the kernel: tests/e2e/test_kernel_ban.py."""

from __future__ import annotations

import ipaddress
import socket
import struct

from hypothesis import given
from hypothesis import strategies as st

from mailgate.receive import cbpf, kernelban
from mailgate.receive.kernelban import KernelBan

KEEP = 0xFFFFFFFF


def run(code: list[cbpf.Instruction], network_header: bytes) -> int:
    """What the kernel would return for a packet with this IP header (the subset we emit)."""
    assert len(code) <= cbpf.BPF_MAXINSNS
    a = x = pc = 0
    while True:
        op, jt, jf, k = code[pc]
        pc += 1
        if op == cbpf.LD_W_ABS:
            offset = k - (cbpf.SKF_NET_OFF & 0xFFFFFFFF)
            (a,) = struct.unpack_from("!I", network_header, offset)
        elif op == cbpf.TAX:
            x = a
        elif op == cbpf.TXA:
            a = x
        elif op == cbpf.ALU_AND_K:
            a &= k
        elif op == cbpf.JEQ_K:
            pc += jt if a == k else jf
        elif op == cbpf.RET_K:
            return k
        else:
            raise AssertionError(f"opcode {op:#x} not interpreted")


def ipv4_header(source: str) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0,
                       ipaddress.IPv4Address(source).packed, b"\x7f\0\0\1")  # fmt: skip


def ipv6_header(source: str) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, 20, 6, 64,
                       ipaddress.IPv6Address(source).packed, b"\0" * 15 + b"\1")  # fmt: skip


def nets(*texts: str) -> list[kernelban.Network]:
    return [ipaddress.ip_network(t, strict=False) for t in texts]


def test_ipv4_banned_hosts_and_networks_are_dropped_others_kept() -> None:
    code = kernelban.program(socket.AF_INET, nets("127.0.0.2", "10.1.0.0/16", "2001:db8::/64"))
    assert run(code, ipv4_header("127.0.0.2")) == 0
    assert run(code, ipv4_header("10.1.200.7")) == 0
    assert run(code, ipv4_header("127.0.0.3")) == KEEP
    assert run(code, ipv4_header("10.2.0.1")) == KEEP


def test_ipv6_prefixes_compare_only_the_words_they_cover() -> None:
    code = kernelban.program(
        socket.AF_INET6, nets("2001:db8:1:2::/64", "::1", "2001:db8:ff00::/40")
    )
    assert run(code, ipv6_header("2001:db8:1:2::99")) == 0
    assert run(code, ipv6_header("2001:db8:1:2:ffff:ffff:ffff:ffff")) == 0
    assert run(code, ipv6_header("::1")) == 0
    assert run(code, ipv6_header("2001:db8:ff12:ab::1")) == 0
    assert run(code, ipv6_header("2001:db8:1:3::99")) == KEEP
    assert run(code, ipv6_header("::2")) == KEEP
    assert run(code, ipv6_header("2001:db8:fe00::1")) == KEEP


def test_no_bans_keeps_everything() -> None:
    assert run(kernelban.program(socket.AF_INET, []), ipv4_header("192.0.2.1")) == KEEP
    assert run(kernelban.program(socket.AF_INET6, []), ipv6_header("2001:db8::1")) == KEEP


@given(st.data(), st.sampled_from([4, 6]))
def test_program_drops_exactly_the_banned_sources(data: st.DataObject, version: int) -> None:
    bits = 32 if version == 4 else 128
    make = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    banned = data.draw(
        st.lists(st.tuples(st.integers(0, 2**bits - 1), st.integers(0, bits)), max_size=30)
    )
    address = make(data.draw(st.integers(0, 2**bits - 1)))
    networks = nets(*(f"{make(a)}/{p}" for a, p in banned))
    expected = 0 if any(address in n for n in networks) else KEEP
    family, header = (
        (socket.AF_INET, ipv4_header) if version == 4 else (socket.AF_INET6, ipv6_header)
    )
    assert run(kernelban.program(family, networks), header(str(address))) == expected


def test_a_full_table_of_ipv6_networks_fits_in_one_program() -> None:
    networks = nets(*(f"2001:db8:{i:x}::/63" for i in range(kernelban.MAX_ENTRIES)))
    assert len(kernelban.program(socket.AF_INET6, networks)) <= cbpf.BPF_MAXINSNS


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_bans_expire_and_the_table_is_bounded() -> None:
    clock = Clock()
    ban = KernelBan(clock, max_entries=2)  # no sockets: the bookkeeping only
    a, b, c = nets("192.0.2.1", "192.0.2.2", "192.0.2.3")
    assert ban.ban(a, 10) and ban.ban(b, 30)
    assert not ban.ban(a, 10), "already banned"
    assert ban.expire() == 10
    assert ban.ban(c, 30)  # full: the ban ending soonest (a) makes room
    assert not ban.is_banned(a) and ban.is_banned(b) and ban.is_banned(c)
    clock.t += 30
    assert ban.expire() is None
    assert not ban.is_banned(b) and not ban.is_banned(c)

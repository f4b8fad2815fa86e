"""Steer each client IP to the same worker process among those sharing a port.

Owns: the classic-BPF program attached with SO_ATTACH_REUSEPORT_CBPF to a SO_REUSEPORT group.
The kernel's default spreads connections by a hash of the 4-tuple, so one client's connections
land on different workers and every per-IP counter (AUTH failures, rate limits, connections per
IP) would be split N ways. The program instead returns `source address mod N`: the same client
address always reaches the same socket, so per-IP defences stay exact with several workers.
receive.serve attaches it to the AUTH services' sockets only. Must not: be needed for
correctness; when the kernel refuses the program, the default hash is used and a warning logged.

Why classic BPF: three instructions, no compiler, no privileges beyond owning the socket.
"""

from __future__ import annotations

import ctypes
import logging
import socket
import struct

log = logging.getLogger(__name__)

SO_ATTACH_REUSEPORT_CBPF = 51  # include/uapi/asm-generic/socket.h
_SKF_NET_OFF = -0x100000  # linux/filter.h: offsets relative to the network header
_BPF_LD_W_ABS = 0x20
_BPF_ALU_MOD_K = 0x94
_BPF_RET_A = 0x16
_IPV4_SADDR = 12  # RFC 791 header: source address at octet 12
_IPV6_SADDR_LOW = 20  # RFC 8200 header: source at octets 8..23; its last 32 bits


def program(family: int, groups: int) -> list[tuple[int, int, int, int]]:
    """(code, jt, jf, k) instructions: A = low 32 bits of the source address; return A % groups."""
    offset = _IPV6_SADDR_LOW if family == socket.AF_INET6 else _IPV4_SADDR
    return [
        (_BPF_LD_W_ABS, 0, 0, (_SKF_NET_OFF + offset) & 0xFFFFFFFF),
        (_BPF_ALU_MOD_K, 0, 0, groups),
        (_BPF_RET_A, 0, 0, 0),
    ]


def steer_by_client_address(sock: socket.socket, groups: int) -> bool:
    """Attach the program to `sock`'s reuseport group; False (and a warning) if refused."""
    if groups < 2:
        return True
    code = program(sock.family, groups)
    filters = (ctypes.c_uint8 * (8 * len(code))).from_buffer_copy(
        b"".join(struct.pack("=HBBI", *ins) for ins in code)
    )
    fprog = struct.pack("HL", len(code), ctypes.addressof(filters))  # struct sock_fprog
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError as e:
        log.warning("reuseport steering unavailable (%s): per-IP limits are per worker", e)
        return False
    return True

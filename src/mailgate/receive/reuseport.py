"""Steer each client IP to the same worker process among those sharing a port.

Owns: the classic-BPF program attached with SO_ATTACH_REUSEPORT_CBPF to a SO_REUSEPORT group.
The kernel's default spreads connections by a hash of the 4-tuple, so one client's connections
land on different workers and every per-IP counter (AUTH failures, rate limits, connections per
IP) would be split N ways. The program instead returns `source address mod N`: the same client
address always reaches the same socket, so per-IP defences stay exact with several workers.
receive.serve attaches it to the AUTH services' sockets only, and only while the counters are
per process (`[state] url` empty): shared counters need no pinning. Must not: be needed for
correctness; when the kernel refuses the program, the default hash is used and a warning logged.
"""

from __future__ import annotations

import logging
import socket

from mailgate.receive import cbpf

log = logging.getLogger(__name__)

_IPV4_SADDR = 12  # RFC 791 header: source address at octet 12
_IPV6_SADDR_LOW = 20  # RFC 8200 header: source at octets 8..23; its last 32 bits


def program(family: int, groups: int) -> list[cbpf.Instruction]:
    """A = low 32 bits of the source address; return A % groups."""
    offset = _IPV6_SADDR_LOW if family == socket.AF_INET6 else _IPV4_SADDR
    return [
        cbpf.load_net_word(offset),
        (cbpf.ALU_MOD_K, 0, 0, groups),
        (cbpf.RET_A, 0, 0, 0),
    ]


def steer_by_client_address(sock: socket.socket, groups: int) -> bool:
    """Attach the program to `sock`'s reuseport group; False (and a warning) if refused."""
    if groups < 2:
        return True
    try:
        cbpf.attach(sock, cbpf.SO_ATTACH_REUSEPORT_CBPF, program(sock.family, groups))
    except OSError as e:
        log.warning("reuseport steering unavailable (%s): per-IP limits are per worker", e)
        return False
    return True

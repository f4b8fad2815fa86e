"""Drop a hammering client's packets in the kernel, before any socket or Python code exists.

Owns: the client networks banned by one worker process, each until an expiry time; the
classic-BPF socket filter built from them; attaching it (SO_ATTACH_FILTER) to the worker's
listening sockets of the AUTH services, and taking entries out when they expire.
Must not: decide who is banned (receive.serve does, from the AUTH guard's refusals), or be
needed for correctness: if the kernel refuses the filter, the 421 refusals simply go on.

Why: a password guesser that was locked out gets `421 4.7.0` when it connects, but a bot that
reconnects thousands of times a second still costs the worker an accept, a protocol object, a
write and a close each time, and honest users on that worker wait behind it. A socket filter on
a listening socket sees the client's SYN (tcp_v4_rcv runs the listener's filter before the
handshake starts): returning 0 drops it in the softirq, the bot's connect() times out, and its
retries are paced by its own SYN back-off. This is fail2ban + nftables built in, without
privileges: owning the socket is enough. Connections accepted while a filter is attached inherit
it; the filter passes every packet of an address that is not banned, so they are unaffected.

The program, per listening socket family (AUTH listeners are IPv6-only or IPv4):

    IPv4:  X = source address; for each network: A = X & mask; if A == net: return 0
    IPv6:  for each network, for each 32-bit word its prefix covers:
           A = word & mask; if A != net word: next network       ... all equal: return 0
    end:   return 0xFFFFFFFF (keep the whole packet)
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable

from mailgate.receive import cbpf

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_ENTRIES = 256  # per worker: 256 IPv6 networks stay under BPF_MAXINSNS (13 each at most)
_KEEP = 0xFFFFFFFF  # a socket filter returns how many octets to keep: all of them
_IPV4_SADDR = 12  # RFC 791: source address at octet 12 of the header
_IPV6_SADDR = 8  # RFC 8200: source address at octets 8..23


def program(family: int, networks: list[Network]) -> list[cbpf.Instruction]:
    """The filter dropping packets whose source is in one of `networks` (of `family`)."""
    if family == socket.AF_INET6:
        code = _ipv6_program([n for n in networks if n.version == 6])
    else:
        code = _ipv4_program([n for n in networks if n.version == 4])
    code.append((cbpf.RET_K, 0, 0, _KEEP))
    return code


def _ipv4_program(networks: list[Network]) -> list[cbpf.Instruction]:
    code: list[cbpf.Instruction] = [cbpf.load_net_word(_IPV4_SADDR), (cbpf.TAX, 0, 0, 0)]
    for net in networks:
        code.append((cbpf.TXA, 0, 0, 0))
        mask = int(net.netmask)
        if mask != 0xFFFFFFFF:
            code.append((cbpf.ALU_AND_K, 0, 0, mask))
        code.append((cbpf.JEQ_K, 0, 1, int(net.network_address)))  # equal: next is the drop
        code.append((cbpf.RET_K, 0, 0, 0))
    return code


def _ipv6_program(networks: list[Network]) -> list[cbpf.Instruction]:
    code: list[cbpf.Instruction] = []
    for net in networks:
        block: list[list[int]] = []  # per covered word: [load offset, mask, value]
        address, mask = int(net.network_address), int(net.netmask)
        for i in range(4):
            shift = 96 - 32 * i
            word_mask = (mask >> shift) & 0xFFFFFFFF
            if word_mask:
                block.append([_IPV6_SADDR + 4 * i, word_mask, (address >> shift) & 0xFFFFFFFF])
        size = sum(2 + (word_mask != 0xFFFFFFFF) for _, word_mask, _ in block) + 1
        entry: list[cbpf.Instruction] = []
        for offset, word_mask, value in block:
            entry.append(cbpf.load_net_word(offset))
            if word_mask != 0xFFFFFFFF:
                entry.append((cbpf.ALU_AND_K, 0, 0, word_mask))
            past_drop = size - len(entry) - 1  # a mismatch jumps to the next network
            entry.append((cbpf.JEQ_K, 0, past_drop, value))
        entry.append((cbpf.RET_K, 0, 0, 0))
        code.extend(entry)
    return code


class KernelBan:
    """The banned networks of one worker and the listening sockets their filter is on."""

    def __init__(
        self, now: Callable[[], float] = time.monotonic, *, max_entries: int = MAX_ENTRIES
    ) -> None:
        self._now = now
        self.max_entries = max_entries
        self._sockets: list[socket.socket] = []
        self._until: dict[Network, float] = {}
        self.working = True  # False once the kernel refused a filter: bans are then no-ops

    def add_socket(self, sock: socket.socket) -> None:
        self._sockets.append(sock)

    def is_banned(self, network: Network) -> bool:
        return network in self._until

    def ban(self, network: Network, seconds: float) -> bool:
        """Drop `network`'s packets for `seconds`; False if already banned or not possible."""
        if not self.working or network in self._until:
            return False
        if len(self._until) >= self.max_entries:
            soonest = min(self._until, key=self._until.__getitem__)
            del self._until[soonest]
        self._until[network] = self._now() + seconds
        self._apply()
        return self.working

    def expire(self) -> float | None:
        """Lift the bans whose time is up; seconds until the next expiry (None: none left)."""
        now = self._now()
        ended = [net for net, until in self._until.items() if until <= now]
        for net in ended:
            del self._until[net]
            log.info("kernel ban lifted client=[%s]", net)
        if ended:
            self._apply()
        if not self._until:
            return None
        return max(0.0, min(self._until.values()) - now)

    def _apply(self) -> None:
        networks = list(self._until)
        for sock in self._sockets:
            if sock.fileno() < 0:
                continue
            try:
                if networks:
                    cbpf.attach(sock, cbpf.SO_ATTACH_FILTER, program(sock.family, networks))
                else:
                    sock.setsockopt(socket.SOL_SOCKET, cbpf.SO_DETACH_FILTER, 0)
            except FileNotFoundError:
                pass  # ENOENT: nothing to detach
            except OSError as e:
                log.warning("kernel ban unavailable (%s): locked-out clients get 421 only", e)
                self.working = False
                return

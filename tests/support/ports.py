"""Free loopback ports for the servers tests start: never a fixed port.

Owns: `free_port`, `free_base` (a base number whose offsets are all free), `free_privileged_port`
(below 1024, for tests started as root), `is_free` (the bind probe) and `accepts` (whether
something listens on a port now).
Ports are drawn at random from below the kernel's ephemeral range and probed with a bind: a
port the kernel hands out for port 0 is also one it hands out as the source port of the next
outgoing connection, so a server started a moment later could find it taken ("Address already
in use"). Below the ephemeral range only listeners compete, and a random draw makes two test
runs on one machine unlikely to pick the same port. A port handed out is not handed out again
by this process for a while: a test often draws several ports (two gateways' listeners) before
any server binds one, and the bind probe alone would hand out the same free port twice.
"""

from __future__ import annotations

import contextlib
import random
import socket
from collections import deque
from collections.abc import Sequence
from pathlib import Path

# Ports recently handed out by this process; bounded, so a long run never runs out.
_RECENT: deque[tuple[str, int]] = deque(maxlen=2000)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nobody listens on right now, outside the ephemeral range."""
    low = _ephemeral_low()
    return _probe(host, range(max(1024, low - 20000), low))


def free_base(offsets: Sequence[int], host: str = "127.0.0.1") -> int:
    """N above 1024 such that N + offset is free on `host` for every offset (a program that
    derives its ports from one base, such as scripts/demo)."""
    top = max(offsets)
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(200):  # bounded
        base = rng.randrange(max(1025, low - 20000), low - top)
        ports = [base + offset for offset in offsets]
        if all(_unclaimed(port, host) for port in ports):
            _RECENT.extend((host, port) for port in ports)
            return base
    raise RuntimeError(f"no free port range for offsets {list(offsets)} on {host}")


def is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether `host` can bind TCP `port` now."""
    if not 0 < port < 65536:
        return False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def accepts(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections on `host`:`port` now."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout):
        return True
    return False


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _probe(host: str, ports: range) -> int:
    """A random port of `ports` that `host` can bind (bounded tries)."""
    rng = random.Random()
    for _ in range(500):  # bounded; thousands of ports are free there
        port = rng.choice(ports)
        if _unclaimed(port, host):
            _RECENT.append((host, port))
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1} on {host}")


def _unclaimed(port: int, host: str) -> bool:
    """Free now, and not handed out by this process lately."""
    return (host, port) not in _RECENT and is_free(port, host)


def free_privileged_port(host: str = "127.0.0.1") -> int:
    """A port below 1024 on `host` that nobody listens on (binding there needs root)."""
    return _probe(host, range(600, 1024))

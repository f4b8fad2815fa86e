"""Free loopback ports for the servers tests start: never a fixed port.

Owns: `free_port`, and `free_privileged_port` (below 1024, for tests started as root).
The kernel picks an unused port for a socket bound to port 0; the socket
is closed again and the port handed to whoever listens next (a small race that a test run on
one machine does not lose in practice, as the kernel does not hand the port out again soon).
"""

from __future__ import annotations

import random
import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nobody listens on right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_privileged_port(host: str = "127.0.0.1") -> int:
    """A port below 1024 on `host` that nobody listens on (probing needs root): random ones are
    tried, since the kernel hands out only ephemeral ports for port 0."""
    rng = random.Random()
    for _ in range(500):  # bounded; loopback has hundreds of free ports there
        port = rng.randrange(600, 1024)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below 1024 on {host}")

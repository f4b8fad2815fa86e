"""Free loopback ports for the servers tests start: never a fixed port.

Owns: `free_port`. The kernel picks an unused port for a socket bound to port 0; the socket
is closed again and the port handed to whoever listens next (a small race that a test run on
one machine does not lose in practice, as the kernel does not hand the port out again soon).
"""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nobody listens on right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])

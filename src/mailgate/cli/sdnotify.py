"""sd_notify(3) without libsystemd: tell systemd (Type=notify) that `mailgate serve` is ready.

Owns: one datagram to $NOTIFY_SOCKET ("READY=1" once every listener is bound, "STOPPING=1"
when stopping). Must not: fail the server; without $NOTIFY_SOCKET (not started by systemd)
it does nothing, and a send that fails is logged once and ignored.
The protocol is systemd's documented one: newline-separated KEY=VALUE assignments in one
datagram to the AF_UNIX socket named by the variable ("@" starts an abstract socket name).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("mailgate.serve")


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to systemd; True if it was sent."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as e:
        log.warning("cannot notify systemd socket=%s: %s", address.lstrip("\0"), e)
        return False
    return True

"""In-process test servers on background threads: the one start-up and shut-down they share.

Owns: `Background`, the base of the servers a test runs inside its own process (stsserver.py,
dnsserver.py, jwks.py, smtpsink.py): `start()` returns the server once its sockets listen,
`stop()` is bounded and may be called twice, and `with Server(...) as s:` does both.
`serve_in_background(server)` runs a `socketserver` server on a daemon thread until `stop()`.
Must not: listen anywhere but where the subclass binds (loopback), or leave a thread running
after `stop()`.
"""

from __future__ import annotations

import socketserver
import threading
from types import TracebackType
from typing import Self

POLL_INTERVAL = 0.05  # how soon serve_forever notices shutdown(); only bounds stop()'s latency
JOIN_TIMEOUT = 5.0  # seconds stop() waits for each serving thread


class Background:
    """A test server: subclasses bind in `_listen()` and hand socketserver servers to
    `serve_in_background`."""

    def __init__(self) -> None:
        self._serving: list[tuple[socketserver.BaseServer, threading.Thread]] = []

    def _listen(self) -> None:
        """Bind the sockets and `serve_in_background()` them (called by `start()`)."""
        raise NotImplementedError

    def _before_stop(self) -> None:
        """Release anything a request handler may be waiting for (called by `stop()`)."""

    def start(self) -> Self:
        self._listen()
        return self

    def serve_in_background(self, server: socketserver.BaseServer) -> None:
        """Run `server` on a daemon thread (its request threads daemonic too) until stop()."""
        if isinstance(server, socketserver.ThreadingMixIn):
            server.daemon_threads = True
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": POLL_INTERVAL},
            name=f"{type(self).__name__}-{len(self._serving)}",
            daemon=True,
        )
        thread.start()
        self._serving.append((server, thread))

    def stop(self) -> None:
        self._before_stop()
        serving, self._serving = self._serving, []
        for server, _ in serving:
            server.shutdown()
            server.server_close()
        for _, thread in serving:
            thread.join(timeout=JOIN_TIMEOUT)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

"""An HTTPS server for tests that serves MTA-STS policies (RFC 8461 §3.3) on loopback.

Owns: answering `GET /.well-known/mta-sts.txt` for whichever `mta-sts.DOMAIN` host the request
names, with the policy, status and content type the test set, over TLS with a certificate for
every `mta-sts.DOMAIN` it serves (from tests/support/testca.py). Records each request as
(host, path). Must not: listen anywhere but loopback.

    with StsServer(ca, ["dest.test"]) as sts:
        sts.policy("dest.test", mode="enforce", mx=["mx.dest.test"])
        # delivery.tls.mta_sts_port = sts.port; DNS: mta-sts.dest.test A 127.0.0.1
"""

from __future__ import annotations

import http.server
import threading
from dataclasses import dataclass

from tests.support.serving import Background
from tests.support.testca import TestCA

HOLD_LIMIT = 20.0  # seconds a held request waits at most


@dataclass
class Served:
    body: bytes
    status: int = 200
    content_type: str = "text/plain"


class StsServer(Background):
    def __init__(self, ca: TestCA, domains: list[str], host: str = "127.0.0.1") -> None:
        super().__init__()
        self.host = host
        self.port = 0
        self.requests: list[tuple[str, str]] = []
        self._served: dict[str, Served] = {}
        self._lock = threading.Lock()
        self._context = ca.server_context(*[f"mta-sts.{d}" for d in domains])
        # Cleared by a test to hold every answer until it is set again (a slow policy host);
        # bounded: a held request is answered after HOLD_LIMIT seconds anyway.
        self.answering = threading.Event()
        self.answering.set()

    def policy(self, domain: str, *, mode: str, mx: list[str], max_age: int = 86400) -> None:
        lines = ["version: STSv1", f"mode: {mode}", *[f"mx: {m}" for m in mx],
                 f"max_age: {max_age}"]  # fmt: skip
        self.serve(domain, Served(("\r\n".join(lines) + "\r\n").encode()))

    def serve(self, domain: str, served: Served) -> None:
        with self._lock:
            self._served[f"mta-sts.{domain}"] = served

    def _listen(self) -> None:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host = (self.headers.get("Host") or "").rsplit(":", 1)[0].lower()
                with owner._lock:
                    owner.requests.append((host, self.path))
                owner.answering.wait(HOLD_LIMIT)
                with owner._lock:
                    served = owner._served.get(host)
                if served is None or self.path != "/.well-known/mta-sts.txt":
                    self.send_error(404)
                    return
                self.send_response(served.status)
                self.send_header("Content-Type", served.content_type)
                self.send_header("Content-Length", str(len(served.body)))
                self.end_headers()
                self.wfile.write(served.body)

            def log_message(self, format: str, *args: object) -> None:
                return

        server = http.server.ThreadingHTTPServer((self.host, 0), Handler)
        server.socket = self._context.wrap_socket(server.socket, server_side=True)
        self.port = int(server.server_address[1])
        self.serve_in_background(server)

    def _before_stop(self) -> None:
        self.answering.set()  # a held request is answered, so its thread ends

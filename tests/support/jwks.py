"""An identity provider's key set for tests: an HTTPS server on loopback that serves a JWKS, and
the signing key, so tests can mint access tokens (valid, expired, for another audience, or
signed by a key the provider does not publish)."""

from __future__ import annotations

import json
import ssl
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.support.serving import Background
from tests.support.testca import TestCA

ISSUER = "https://idp.example.org/realms/staff"
AUDIENCE = "mailgate"


class Provider(Background):
    """Keys, tokens, and the JWKS endpoint at `url` (https://127.0.0.1:PORT/jwks)."""

    def __init__(self, ca: TestCA) -> None:
        super().__init__()
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "key-1"
        self.fetches = 0
        jwk = RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        self.jwks = {"keys": [{**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}]}
        issued = ca.issue("localhost")
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                provider.fetches += 1
                body = json.dumps(provider.jwks).encode()
                self.send_response(200 if self.path == "/jwks" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(issued.cert, issued.key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/jwks"

    def _listen(self) -> None:
        # Bound in __init__, so that `url` is known before start().
        self.serve_in_background(self.server)

    def token(self, login: str, *, audience: str = AUDIENCE, expires_in: float = 300,
              key: rsa.RSAPrivateKey | None = None, **claims: Any) -> str:  # fmt: skip
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": audience, "iat": now, "nbf": now,
                   "exp": now + int(expires_in), "sub": f"id-{login}",
                   "preferred_username": login, **claims}  # fmt: skip
        return jwt.encode(payload, key or self.key, algorithm="RS256", headers={"kid": self.kid})

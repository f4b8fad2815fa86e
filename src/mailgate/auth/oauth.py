"""Bearer tokens for OAUTHBEARER (RFC 7628) and XOAUTH2: JWT access tokens from the institution's
identity provider (OpenID Connect: Keycloak, Entra ID, Google, ...).

Owns: verifying a JWT access token (RFC 7519, RFC 9068) and naming its login: the signature
against the provider's JSON Web Key Set (RFC 7517), fetched over HTTPS from `jwks_url` (verified
against `ca_file` or the system's CAs) and kept for `jwks_cache` seconds; an allow-list of
asymmetric algorithms (never "none" or a shared-secret HS*, whose key would be the public key
set); `iss` equal to `issuer`; `aud` containing `audience`; `exp` in the future and `nbf`/`iat`
not in it (60 s of leeway for clocks); the login from the `login_claim` claim.
Must not: log tokens, or accept a token whose key is unknown without first asking the provider
(a key rotation) - but ask at most once a minute, so that tokens naming made-up keys cannot make
us hammer the provider.

Outcomes: the login (a string), None (any verification failure: 535 5.7.8), or AuthUnavailable
when the key set cannot be fetched and no earlier copy is at hand (454 4.7.0).

Library: PyJWT with `cryptography` (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import urllib.request
from typing import Any

import jwt

from mailgate.config import OAuthConfig
from mailgate.errors import AuthUnavailable

log = logging.getLogger(__name__)

LEEWAY = 60.0  # seconds of clock difference tolerated for exp, nbf and iat
REFETCH_AFTER = 60.0  # an unknown key id fetches the key set again, at most this often
MAX_JWKS_BYTES = 1024 * 1024


class TokenVerifier:
    def __init__(self, cfg: OAuthConfig) -> None:
        self.cfg = cfg
        self._keys: dict[str, Any] = {}  # kid ("" when absent) -> PyJWK
        self._fetched_at = -1e18
        self._lock = asyncio.Lock()
        self._tls = ssl.create_default_context(
            cafile=str(cfg.ca_file) if cfg.ca_file is not None else None
        )

    async def login(self, token: str) -> str | None:
        """The login the token names when it verifies, else None."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            return None
        algorithm = header.get("alg")
        if algorithm not in self.cfg.algorithms:
            return None
        key = await self._key(str(header.get("kid") or ""))
        if key is None:
            return None
        try:
            claims = jwt.decode(
                token, key.key, algorithms=[algorithm], audience=self.cfg.audience,
                issuer=self.cfg.issuer, leeway=LEEWAY,
                options={"require": ["exp", "iss", "aud"]},
            )  # fmt: skip
        except jwt.InvalidTokenError as e:
            log.info("oauth token refused: %s", type(e).__name__)
            return None
        login = claims.get(self.cfg.login_claim)
        return login if isinstance(login, str) and login else None

    async def _key(self, kid: str) -> Any:
        now = time.monotonic()
        stale = now - self._fetched_at > self.cfg.jwks_cache
        unknown = self._find(kid) is None and now - self._fetched_at > REFETCH_AFTER
        if stale or unknown:
            async with self._lock:  # one fetch for all the sessions waiting on it
                if time.monotonic() - self._fetched_at > min(REFETCH_AFTER, self.cfg.jwks_cache):
                    await self._refresh()
        return self._find(kid)

    def _find(self, kid: str) -> Any:
        if kid:
            return self._keys.get(kid)
        # A token without "kid": unambiguous only when the set has a single key.
        return next(iter(self._keys.values())) if len(self._keys) == 1 else None

    async def _refresh(self) -> None:
        try:
            keys = await asyncio.wait_for(asyncio.to_thread(self._fetch), self.cfg.timeout + 1)
        except (OSError, ValueError, TimeoutError, jwt.PyJWKSetError) as e:
            if not self._keys:
                raise AuthUnavailable(f"{self.cfg.jwks_url}: {e}") from None
            # Keep using the keys we have: a provider outage must not lock everybody out.
            log.warning("oauth jwks fetch failed, keeping %d cached keys: %s", len(self._keys), e)
            self._fetched_at = time.monotonic()
            return
        self._keys = keys
        self._fetched_at = time.monotonic()
        log.info("oauth jwks fetched url=%s keys=%d", self.cfg.jwks_url, len(keys))

    def _fetch(self) -> dict[str, Any]:
        """GET the key set (in a thread); only keys for signatures with a usable algorithm."""
        # jwks_url is https:// (config.py checks it): no file: or other schemes.
        url, accept = self.cfg.jwks_url, {"Accept": "application/json"}
        request = urllib.request.Request(url, headers=accept)  # noqa: S310
        opened = urllib.request.urlopen(request, timeout=self.cfg.timeout, context=self._tls)  # noqa: S310
        with opened as response:
            body = response.read(MAX_JWKS_BYTES + 1)
        if len(body) > MAX_JWKS_BYTES:
            raise ValueError("key set larger than 1 MiB")
        data = json.loads(body)
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise ValueError("not a JWK set")
        usable = [k for k in data["keys"] if isinstance(k, dict) and k.get("use", "sig") == "sig"]
        keys: dict[str, Any] = {}
        for jwk in jwt.PyJWKSet.from_dict({"keys": usable}).keys:
            keys[str(jwk.key_id or "")] = jwk
        return keys

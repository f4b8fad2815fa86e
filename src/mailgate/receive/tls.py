"""Server TLS contexts from [tls], with reload when the files change (ACME renewals).

Owns: the SSLContext every listener uses. TLS 1.2 is the minimum (RFC 8996 retired 1.0/1.1;
RFC 8314 §4.1), with forward-secret AEAD suites only. Must not: do any SMTP.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

log = logging.getLogger(__name__)

# TLS 1.2 suites: ECDHE with AES-GCM or ChaCha20 only; TLS 1.3 suites are all modern.
_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!SHA1:!RSA"


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side context; raises OSError/ssl.SSLError when the files are unusable."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.load_cert_chain(cert, key)
    return ctx


class ReloadingContext:
    """One SSLContext whose certificate is reloaded in place when the files' mtimes change.

    Reloading into the same context object means listeners created with it (implicit TLS) pick up
    the new certificate for new handshakes without a restart.
    """

    def __init__(self, cert: Path, key: Path) -> None:
        self._cert = cert
        self._key = key
        self.context = server_context(cert, key)
        self._stamp = self._mtimes()

    def _mtimes(self) -> tuple[float, float]:
        try:
            return (self._cert.stat().st_mtime, self._key.stat().st_mtime)
        except OSError:
            return (0.0, 0.0)

    def use(self, cert: Path, key: Path) -> None:
        """`mailgate reload`: load these files now (the paths may be new). Raises OSError or
        ssl.SSLError, keeping the previous certificate, when they are unusable."""
        server_context(cert, key)  # validate on a throwaway context first
        self.context.load_cert_chain(cert, key)
        self._cert, self._key = cert, key
        self._stamp = self._mtimes()
        log.info("tls reloaded cert=%s", cert)

    def maybe_reload(self) -> bool:
        """Reload if the files changed; keep the old certificate if the new one is unusable."""
        stamp = self._mtimes()
        if stamp == self._stamp:
            return False
        try:
            server_context(self._cert, self._key)  # validate on a throwaway context first
            self.context.load_cert_chain(self._cert, self._key)
        except (OSError, ssl.SSLError) as e:
            log.error("tls reload failed cert=%s: %s (keeping the previous certificate)",
                      self._cert, e)  # fmt: skip
            return False
        self._stamp = stamp
        log.info("tls reloaded cert=%s", self._cert)
        return True

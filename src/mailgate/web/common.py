"""What every page of ours shares: the security headers and HTML responses.

Owns: the Content-Security-Policy (nothing may be loaded from anywhere; inline styles only,
so a value that escaped escaping still could not run a script or fetch anything) and the
other response headers of our pages. Must not: build page content (the page modules do).
"""

from __future__ import annotations

from typing import TypeVar

from aiohttp import web

from mailgate.web.html import Html

CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


R = TypeVar("R", bound=web.StreamResponse)


def secure(response: R) -> R:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    return response


def html_response(document: Html, *, status: int = 200, private: bool = False) -> web.Response:
    response = web.Response(text=document, status=status, content_type="text/html",
                            charset="utf-8")  # fmt: skip
    if private:
        response.headers["Cache-Control"] = "no-store"
    secure(response)
    return response

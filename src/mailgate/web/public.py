"""`[web] listen`: mail programs set themselves up, and people read their settings.

Owns: the public application: `GET /mail/config-v1.1.xml` and
`GET /.well-known/autoconfig/mail/config-v1.1.xml` (Thunderbird), `POST
/autodiscover/autodiscover.xml` (Outlook, POX), `GET /apple/mobileconfig` (Apple), `GET
/settings` (people), each for an address in a managed domain. Must not: say anything about
an address beyond its domain (no directory look-up of accounts: mailprograms.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from urllib.parse import urlencode

from aiohttp import web

from mailgate.config import Config
from mailgate.web import setup_formats
from mailgate.web.common import html_response, secure
from mailgate.web.html import Html, join, page, render
from mailgate.web.mailprograms import (
    Address,
    BadAddress,
    MailSettings,
    parse_address,
    settings_for,
)

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT = 5.0  # seconds for "is this domain ours?"; then 503


@dataclass(slots=True)
class WebContext:
    """What the public pages need. is_managed(domain) blocks (the directory): run in a thread."""

    cfg: Config
    is_managed: Callable[[str], bool]


CONTEXT = web.AppKey("mailgate.web", WebContext)
XML = "application/xml"
MOBILECONFIG = "application/x-apple-aspen-config"


class NotOurs(Exception):
    """The address's domain is not a managed domain: 404 in each format."""

    def __init__(self, domain: str) -> None:
        super().__init__(domain)
        self.domain = domain


class Unavailable(Exception):
    """The directory did not answer: 503."""


def make_web_app(context: WebContext) -> web.Application:
    app = web.Application(client_max_size=setup_formats.MAX_REQUEST)
    app[CONTEXT] = context
    app.router.add_get("/mail/config-v1.1.xml", _thunderbird)
    app.router.add_get("/.well-known/autoconfig/mail/config-v1.1.xml", _thunderbird)
    # Outlook asks for both spellings; aiohttp's routes are case-sensitive.
    app.router.add_post("/autodiscover/autodiscover.xml", _autodiscover)
    app.router.add_post("/Autodiscover/Autodiscover.xml", _autodiscover)
    app.router.add_get("/apple/mobileconfig", _mobileconfig)
    app.router.add_get("/settings", _settings)
    app.router.add_get("/", _index)
    return app


async def _settings_of(request: web.Request, text: str) -> MailSettings:
    """The settings for `text`; BadAddress, NotOurs or Unavailable."""
    context = request.app[CONTEXT]
    address = parse_address(text)
    try:
        ours = await asyncio.wait_for(
            asyncio.to_thread(context.is_managed, address.domain), LOOKUP_TIMEOUT
        )
    except TimeoutError:
        raise Unavailable("the directory did not answer in time") from None
    except Exception as e:  # the database is down: the driver's error is the answer
        log.warning("web: managed-domain look-up failed: %s: %s", type(e).__name__, e)
        raise Unavailable("the directory cannot be read") from None
    if not ours:
        raise NotOurs(address.domain)
    return settings_for(context.cfg, address)


def _settings_url(request: web.Request, address: Address | str) -> str:
    return str(request.url.with_path("/settings").with_query(emailaddress=str(address)))


# --- Thunderbird ------------------------------------------------------------------------------


async def _thunderbird(request: web.Request) -> web.Response:
    text = request.query.get("emailaddress", "")
    placeholders = not text.strip()
    if placeholders:
        # No address given: the domain the client asked (autoconfig.DOMAIN, or DOMAIN for the
        # .well-known form), with Thunderbird's own placeholders for the username.
        text = "user@" + (request.host.rpartition(":")[0] or request.host).removeprefix(
            "autoconfig."
        )
    try:
        settings = await _settings_of(request, text)
        if placeholders:
            local = settings.username_is_local_part
            settings = replace(settings, username="%EMAILLOCALPART%" if local else "%EMAILADDRESS%")
    except BadAddress as e:
        return _plain(400, f"emailaddress: {e}\n")
    except NotOurs as e:
        return _xml(setup_formats.thunderbird_unknown(e.domain), status=404)
    except Unavailable as e:
        return _plain(503, f"{e}; try again later\n")
    body = setup_formats.thunderbird(settings, settings_url=_settings_url(request, text))
    return _xml(body)


# --- Outlook ----------------------------------------------------------------------------------


async def _autodiscover(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        text, schema = setup_formats.read_autodiscover_request(body)
    except setup_formats.BadRequest as e:
        return _xml(setup_formats.outlook_error(600, f"Invalid Request: {e}"))
    if schema and schema != setup_formats.OUTLOOK_RESPONSE_NS:
        # e.g. the mobilesync (ActiveSync) schema: not a provider we are.
        return _xml(setup_formats.outlook_error(601, "Provider is not available"))
    try:
        settings = await _settings_of(request, text)
    except BadAddress as e:
        return _xml(setup_formats.outlook_error(600, f"Invalid Request: {e}"))
    except NotOurs as e:
        return _xml(setup_formats.outlook_error(
            500, f"The e-mail address cannot be found: {e.domain} is not served here"))  # fmt: skip
    except Unavailable as e:
        return _plain(503, f"{e}; try again later\n")
    return _xml(setup_formats.outlook(settings))


# --- Apple ------------------------------------------------------------------------------------


async def _mobileconfig(request: web.Request) -> web.StreamResponse:
    text = request.query.get("emailaddress", "")
    try:
        settings = await _settings_of(request, text)
    except (BadAddress, NotOurs, Unavailable) as e:
        return await _settings_page(request, text, error=e)
    cfg = request.app[CONTEXT].cfg
    profile = setup_formats.apple_profile(settings, organisation=cfg.hostname)
    try:
        signed = await asyncio.to_thread(
            setup_formats.sign_profile, profile, cfg.tls.cert, cfg.tls.key
        )
    except (OSError, ValueError) as e:  # no certificate, or one that does not load
        log.warning("web: mobileconfig not signed: %s", e)
        signed = None
    response = web.Response(body=signed or profile, content_type=MOBILECONFIG)
    filename = f"{settings.address.domain}.mobileconfig"
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return secure(response)


# --- people -----------------------------------------------------------------------------------


async def _index(request: web.Request) -> web.Response:
    raise web.HTTPFound("/settings")


async def _settings(request: web.Request) -> web.Response:
    text = request.query.get("emailaddress", "")
    if not text.strip():
        return html_response(_ask_page(request.app[CONTEXT].cfg))
    try:
        settings = await _settings_of(request, text)
    except (BadAddress, NotOurs, Unavailable) as e:
        return await _settings_page(request, text, error=e)
    return html_response(settings_page(request.app[CONTEXT].cfg, settings))


async def _settings_page(request: web.Request, text: str, *, error: Exception) -> web.Response:
    cfg = request.app[CONTEXT].cfg
    if isinstance(error, NotOurs):
        body = render(_NOT_OURS, address=text.strip(), domain=error.domain, hostname=cfg.hostname)
        return html_response(page("Not a mail domain served here", join([body, _form(text)])),
                             status=404)  # fmt: skip
    if isinstance(error, Unavailable):
        body = render("<h1>Please try again later</h1><p>{why}.</p>", why=str(error))
        return html_response(page("Please try again later", body), status=503)
    body = render("<h1>That is not an email address</h1><p>{why}.</p>", why=str(error))
    return html_response(page("Not an email address", join([body, _form(text)])), status=400)


_FORM = """<form method="get" action="/settings">
<label for="emailaddress">Your email address</label><br>
<input type="email" id="emailaddress" name="emailaddress" value="{value}" size="30"
 autocomplete="email" required>
<button type="submit">Show settings</button>
</form>"""


def _form(value: str = "") -> Html:
    return render(_FORM, value=value)


def _ask_page(cfg: Config) -> Html:
    body = render(
        "<h1>Email program settings</h1>"
        "<p>Type your email address to see the settings your mail program needs to send "
        "email through {hostname}.</p>{form}",
        hostname=cfg.hostname,
        form=_form(),
    )
    return page("Email program settings", body)


_NOT_OURS = """<h1>Not a mail domain served here</h1>
<p><strong>{domain}</strong> is not one of the mail domains that {hostname} sends mail for,
so there are no settings to show for <span class="mono">{address}</span>.</p>
<p>Check the address for typing mistakes. If your email is provided by another service,
configure your software to use that service's message submission server instead (usually on
port 587 or 465).</p>"""


def _server_block(label: str, hostname: str, port: int, security: str, how: str,
                  username: str) -> Html:  # fmt: skip
    return render(
        """<section class="server" aria-labelledby="{anchor}">
<h3 id="{anchor}">{label}</h3>
<dl class="settings">
<dt>Server</dt><dd class="mono" data-setting="server">{hostname}</dd>
<dt>Port</dt><dd data-setting="port">{port}</dd>
<dt>Security</dt><dd data-setting="security">{security}</dd>
<dt>Authentication</dt><dd>Normal password</dd>
<dt>Username</dt><dd class="mono" data-setting="username">{username}</dd>
</dl>
<p class="note">{how}</p>
</section>""",
        anchor=f"port-{port}",
        label=label,
        hostname=hostname,
        port=port,
        security=security,
        how=how,
        username=username,
    )


def settings_page(cfg: Config, settings: MailSettings) -> Html:
    """The page for people: in the words of the "email program settings" page."""
    blocks = []
    for server in settings.outgoing:
        if server.security == "SSL":
            blocks.append(_server_block(
                f"Port {server.port}: SSL/TLS (recommended)", server.hostname, server.port,
                "SSL/TLS", "The connection is encrypted from the start (sometimes called "
                "\u201cSSL\u201d or \u201cimplicit TLS\u201d).", settings.username))  # fmt: skip
        else:
            blocks.append(_server_block(
                f"Port {server.port}: STARTTLS", server.hostname, server.port, "STARTTLS",
                "Use this if your software does not offer SSL/TLS: the connection starts "
                "unencrypted and is then secured with STARTTLS before you log in.",
                settings.username))  # fmt: skip
    if not blocks:
        blocks.append(Html("<p>No message submission service is configured here.</p>"))
    if settings.username_is_local_part:
        username_note = render(
            "Your username is the part of your address before the @: "
            '<strong class="mono">{username}</strong>. If this address was given to an '
            "account with another name, log in with that account's name instead.",
            username=settings.username,
        )
    else:
        username_note = render(
            "Your username is your whole email address: <strong class=\"mono\">{username}"
            "</strong>.", username=settings.username)  # fmt: skip
    port25 = [render(
        "<p>Many networks, including ours, block outgoing connections to port 25 (the port "
        "mail servers use between themselves). Because of the port 25 block, you must "
        "configure your software to use an alternative port: {ports}, depending on what your "
        "software supports. Do not set your mail program to port 25.</p>",
        ports=" or ".join(str(s.port) for s in settings.outgoing) or "465 or 587",
    )]  # fmt: skip
    if cfg.smarthost.listen:
        port25.append(render(
            "<p>Computers on the organisation's own network whose software cannot use an "
            "alternative port may use the smart host on port {port} instead. In this case you "
            "must turn off any security or authentication options for SMTP, but leave them on "
            "for IMAP or POP.</p>", port=cfg.smarthost.listen[0].port))  # fmt: skip
    auto = render(
        "<p>Thunderbird and Outlook can set themselves up: type your address and password "
        "when adding the account, and they find these settings. On an iPhone, iPad or Mac, "
        '<a href="{profile}">download a configuration profile</a> and open it.</p>',
        profile="/apple/mobileconfig?" + urlencode({"emailaddress": str(settings.address)}),
    )
    body = render(
        """<h1>Email program settings</h1>
<p>For <strong class="mono" id="address">{address}</strong>. These are the outgoing mail
(SMTP) settings for your mail program (client); for incoming mail (IMAP or POP){incoming}.</p>
<p>All email sent via {hostname} must be securely authenticated: your program logs in with
your username and password, over an encrypted connection.</p>
<h2>Outgoing mail server (SMTP)</h2>
<p>Use one of these; both work from anywhere on the Internet.</p>
{blocks}
<h2>Username</h2>
<p>{username_note} Your password is the one for that account.</p>
<h2>The port 25 block</h2>
{port25}
<h2>Setting up automatically</h2>
{auto}""",
        address=str(settings.address),
        hostname=cfg.hostname,
        incoming=_incoming_words(settings),
        blocks=join(blocks, "\n"),
        username_note=username_note,
        port25=join(port25),
        auto=auto,
    )
    return page(f"Email program settings for {settings.address}", body)


def _incoming_words(settings: MailSettings) -> Html:
    if settings.incoming is None:
        return Html(" see your mail provider's own settings")
    security = "SSL/TLS" if settings.incoming.security == "SSL" else "STARTTLS"
    return render(" use IMAP server <span class=\"mono\">{host}</span>, port {port}, {security}",
                  host=settings.incoming.hostname, port=settings.incoming.port,
                  security=security)  # fmt: skip


# --- responses --------------------------------------------------------------------------------


def _xml(body: bytes, *, status: int = 200) -> web.Response:
    response = web.Response(body=body, status=status, content_type=XML, charset="utf-8")
    return secure(response)


def _plain(status: int, text: str) -> web.Response:
    response = web.Response(text=text, status=status, content_type="text/plain")
    return secure(response)

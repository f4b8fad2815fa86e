"""The operator pages on `[admin] listen`: `/` (the service at a glance) and `/trace` (one
message's story), behind HTTP Basic auth when `[admin] password_file` is set.

Owns: those pages, the 24-hour chart (inline SVG drawn here: no script, no external
request), and the Basic auth check (RFC 7617; user "admin", the password file's one line,
compared in constant time). /metrics, /healthz and /readyz stay open (INTERFACE.md: the
password guards the operator pages). Must not: change anything it shows; its figures come
from `mailgate.status` through the callable `cli` hands it, traces from `tracelog.query`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from aiohttp import web

from mailgate.status import Overview, QueuedMessage
from mailgate.tracelog.query import MessageTrace, find
from mailgate.web.common import html_response, secure
from mailgate.web.html import Html, join, page, render

log = logging.getLogger(__name__)

USER = "admin"
REALM = "mailgate operators"
PAGE_TIMEOUT = 20.0  # seconds to gather a page's figures (a large spool, a slow directory)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class OperatorContext:
    """overview(): the figures (blocking: run in a thread). trace: the event log's folder.
    password_file: None leaves the pages open (bind [admin] to a management address)."""

    hostname: str
    overview: Callable[[], Overview]
    trace: Path
    password_file: Path | None


CONTEXT = web.AppKey("mailgate.operator", OperatorContext)


def add_operator_pages(app: web.Application, context: OperatorContext) -> None:
    app[CONTEXT] = context
    app.router.add_get("/", _protected(_overview))
    app.router.add_get("/trace", _protected(_trace))


# --- HTTP Basic auth --------------------------------------------------------------------------


def _protected(handler: Handler) -> Handler:
    async def checked(request: web.Request) -> web.StreamResponse:
        password_file = request.app[CONTEXT].password_file
        if password_file is not None:
            try:
                expected = await asyncio.to_thread(read_password, password_file)
            except OSError as e:  # fail closed: no page without the password to check
                log.warning("admin: password file unreadable path=%s: %s", password_file, e)
                return secure(web.Response(status=503, text="password file unreadable\n"))
            if not is_authorised(request.headers.get("Authorization", ""), expected):
                return secure(
                    web.Response(
                        status=401,
                        text="authentication required\n",
                        headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
                    )
                )
        return await handler(request)

    return checked


def read_password(path: Path) -> str:
    """The file's first line, without its line ending (read at each request, so a changed
    password holds at once)."""
    return path.read_text(encoding="utf-8").splitlines()[0] if path.stat().st_size else ""


def is_authorised(header: str, password: str) -> bool:
    """`Authorization: Basic base64(admin:password)` (RFC 7617). The user and the password
    are compared as SHA-256 digests with hmac.compare_digest: the time taken says nothing
    about how much of either was right, nor their lengths. An empty password never matches."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic" or not password:
        return False
    try:
        user, sep, given = base64.b64decode(token.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    user_ok = hmac.compare_digest(_digest(user), _digest(USER))
    password_ok = hmac.compare_digest(_digest(given), _digest(password))
    return bool(sep) and user_ok and password_ok


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


# --- the overview -----------------------------------------------------------------------------


async def _overview(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    try:
        figures = await asyncio.wait_for(asyncio.to_thread(context.overview), PAGE_TIMEOUT)
    except Exception as e:  # the directory or the spool could not be read: say so
        log.warning("admin: overview failed: %s: %s", type(e).__name__, e)
        body = render("<h1>Figures unavailable</h1><p>{why}</p>", why=f"{type(e).__name__}: {e}")
        return html_response(page("Figures unavailable", body), status=503, private=True)
    return html_response(overview_page(context.hostname, figures), private=True)


def overview_page(hostname: str, o: Overview) -> Html:
    queue = o.queue
    counts = join(
        render("<li><strong>{n}</strong> {state}</li>", n=n, state=state)
        for state, n in queue.counts.items()
    )
    last_hour = join(
        render("<li><strong>{n}</strong> {kind}</li>", n=n, kind=kind)
        for kind, n in o.last_hour.counts.items()
    )
    sections = [
        render(
            """<h1>mailgate on {hostname}</h1>
<p class="note">As of {now} UTC. <a href="/">Refresh</a></p>
<h2 id="queue">Queue</h2>
<ul class="figures" data-figures="queue">{counts}<li>oldest {age}</li></ul>
<h2 id="traffic">Last 24 hours</h2>
{chart}
<h2>Last hour</h2>
<ul class="figures" data-figures="last-hour">{last_hour}</ul>""",
            hostname=hostname,
            now=_when(o.now),
            counts=counts,
            age=_age(timedelta(seconds=queue.oldest_seconds)),
            chart=chart(o),
            last_hour=last_hour,
        ),
        _senders("Top senders by login (last hour)", "Login", o.last_hour.top_logins, link=True),
        _senders(
            "Top senders by client network (last hour)",
            "Network",
            o.last_hour.top_networks,
            link=False,
        ),
        _suspended(o.suspended),
        _messages("Held mail", "held", queue.oldest.get("held", []), queue.counts.get("held", 0)),
    ]
    for state in ("deferred", "active"):
        sections.append(
            _messages(
                f"Oldest {state} messages",
                state,
                queue.oldest.get(state, []),
                queue.counts.get(state, 0),
            )
        )
    sections.append(Html(_SEARCH))
    return page(f"mailgate on {hostname}", join(sections, "\n"))


_SEARCH = """<h2>Trace a message</h2>
<form method="get" action="/trace">
<label for="q">Queue id, Message-ID, address or login</label><br>
<input type="text" id="q" name="q" size="30" required> <button type="submit">Trace</button>
</form>"""


def _senders(title: str, what: str, rows: Sequence[tuple[str, int, int]], *, link: bool) -> Html:
    if not rows:
        return render("<h2>{title}</h2><p>None.</p>", title=title)
    body = join(
        render(
            '<tr><td class="mono">{who}</td><td>{n}</td><td>{r}</td></tr>',
            who=_trace_link(who) if link else who,
            n=n,
            r=r,
        )
        for who, n, r in rows
    )
    return render(
        '<h2>{title}</h2><div class="scroll"><table><thead><tr><th>{what}</th>'
        "<th>Messages</th><th>Recipients</th></tr></thead><tbody>{body}</tbody></table></div>",
        title=title,
        what=what,
        body=body,
    )


def _suspended(logins: Sequence[str]) -> Html:
    if not logins:
        return Html("<h2>Suspended accounts</h2><p>None.</p>")
    items = join(render('<li class="mono">{who}</li>', who=_trace_link(who)) for who in logins)
    return render('<h2>Suspended accounts</h2><ul data-list="suspended">{items}</ul>', items=items)


def _messages(title: str, state: str, messages: Sequence[QueuedMessage], total: int) -> Html:
    if not messages:
        return render("<h2>{title}</h2><p>None.</p>", title=title)
    rows = join(
        render(
            '<tr><td class="mono nowrap" data-label="Queue id">{qid}</td>'
            '<td class="nowrap" data-label="Age">{age}</td>'
            '<td class="mono" data-label="From">{sender}</td>'
            '<td class="mono" data-label="To">{rcpts}</td>'
            '<td data-field="subject" data-label="Subject">{subject}</td>'
            '<td data-label="Tries">{attempts}</td>'
            '<td data-label="Last reply">{reply}</td></tr>',
            qid=_trace_link(m.qid),
            age=_age(_now() - m.received_at),
            sender=m.mail_from or "<>",
            rcpts=", ".join(m.recipients),
            subject=m.subject,
            attempts=m.attempts,
            reply=m.last_reply,
        )
        for m in messages
    )
    more = f" (the oldest {len(messages)} of {total})" if total > len(messages) else ""
    return render(
        '<h2>{title}{more}</h2><div class="scroll"><table class="stack" data-queue="{state}">'
        "<thead><tr>"
        "<th>Queue id</th><th>Age</th><th>From</th><th>To</th><th>Subject</th><th>Tries</th>"
        "<th>Last reply</th></tr></thead><tbody>{rows}</tbody></table></div>",
        title=title,
        more=more,
        state=state,
        rows=rows,
    )


def _trace_link(query: str) -> Html:
    return render('<a href="/trace?{q}">{text}</a>', q=_query(query), text=query)


def _query(value: str) -> str:
    from urllib.parse import urlencode

    return urlencode({"q": value})


# --- the chart --------------------------------------------------------------------------------

SERIES = (("accepted", "#1a73e8"), ("refused", "#d93025"), ("delivered", "#188038"))
_W, _H, _LEFT, _BOTTOM, _TOP = 720, 260, 52, 30, 12


def chart(o: Overview) -> Html:
    """Accepted, refused and delivered per hour as grouped bars in inline SVG, with the same
    figures in a table for screen readers and for copying."""
    buckets = o.by_hour
    peak = max((b[name] for b in buckets for name, _ in SERIES), default=0)
    scale = _nice(peak)
    plot_w, plot_h = _W - _LEFT - 8, _H - _BOTTOM - _TOP
    slot = plot_w / max(1, len(buckets))
    bar = max(1.0, slot / (len(SERIES) + 1))
    parts: list[Html] = []
    for tick in range(5):  # horizontal grid lines and their values
        value = scale * tick / 4
        y = _TOP + plot_h - plot_h * tick / 4
        parts.append(
            render(
                '<line x1="{x1}" y1="{y}" x2="{x2}" y2="{y}" stroke="#8888"/>'
                '<text x="{tx}" y="{ty}" font-size="14" text-anchor="end" '
                'fill="currentColor">{v}</text>',
                x1=_LEFT,
                x2=_W - 8,
                y=f"{y:.1f}",
                tx=_LEFT - 6,
                ty=f"{y + 4:.1f}",
                v=f"{value:g}",
            )
        )
    for i, bucket in enumerate(buckets):
        x0 = _LEFT + i * slot + bar / 2
        hour = datetime.fromtimestamp(o.by_hour_start + i * 3600, UTC)
        for j, (name, colour) in enumerate(SERIES):
            h = plot_h * bucket[name] / scale if scale else 0
            parts.append(
                render(
                    '<rect x="{x}" y="{y}" width="{w}" height="{h}" fill="{c}">'
                    "<title>{label}</title></rect>",
                    x=f"{x0 + j * bar:.1f}",
                    y=f"{_TOP + plot_h - h:.1f}",
                    w=f"{bar:.1f}",
                    h=f"{h:.1f}",
                    c=colour,
                    label=f"{hour:%H}:00 {name}: {bucket[name]}",
                )
            )
        if i % 3 == 0:
            parts.append(
                render(
                    '<text x="{x}" y="{y}" font-size="14" text-anchor="middle" '
                    'fill="currentColor">{t}</text>',
                    x=f"{x0 + bar * 1.5:.1f}",
                    y=_H - 8,
                    t=f"{hour:%H}h",
                )
            )
    legend = join(
        render(
            '<li><svg width="12" height="12" aria-hidden="true"><rect width="12" '
            'height="12" fill="{c}"/></svg> {name}</li>',
            c=colour,
            name=name,
        )
        for name, colour in SERIES
    )
    rows = join(
        render(
            "<tr><td>{h}</td><td>{a}</td><td>{r}</td><td>{d}</td></tr>",
            h=f"{datetime.fromtimestamp(o.by_hour_start + i * 3600, UTC):%Y-%m-%d %H}:00",
            a=b["accepted"],
            r=b["refused"],
            d=b["delivered"],
        )
        for i, b in enumerate(buckets)
    )
    totals = {name: sum(b[name] for b in buckets) for name, _ in SERIES}
    return render(
        """<figure>
<div class="scroll chart">
<svg id="traffic-chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img"
 aria-labelledby="chart-title" xmlns="http://www.w3.org/2000/svg">
<title id="chart-title">Messages per hour over the last 24 hours: {summary}</title>
{parts}
</svg>
</div>
<figcaption><ul class="figures">{legend}</ul></figcaption>
</figure>
<details><summary>The figures as a table</summary><div class="scroll"><table>
<thead><tr><th>Hour (UTC)</th><th>Accepted</th><th>Refused</th><th>Delivered</th></tr></thead>
<tbody>{rows}</tbody></table></div></details>""",
        w=_W,
        h=_H,
        parts=join(parts),
        legend=legend,
        rows=rows,
        summary=", ".join(f"{n} {name}" for name, n in totals.items()),
    )


def _nice(peak: int) -> int:
    """The axis maximum: 4, or the next of 1, 2, 5 x 10^n at or above `peak` (4 ticks)."""
    if peak <= 4:
        return 4
    step = 1
    while True:  # bounded: step grows tenfold every three turns
        for m in (1, 2, 5):
            if m * step * 4 >= peak:
                return m * step * 4
        step *= 10


# --- trace ------------------------------------------------------------------------------------


async def _trace(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    query = request.query.get("q", "").strip()
    if not query:
        raise web.HTTPFound("/")
    traces = await asyncio.wait_for(asyncio.to_thread(find, context.trace, query), PAGE_TIMEOUT)
    return html_response(trace_page(query, traces), status=200 if traces else 404, private=True)


def trace_page(query: str, traces: Sequence[MessageTrace]) -> Html:
    if not traces:
        body = render(
            '<h1>Trace</h1><p>No message matches <span class="mono">{q}</span> in '
            'the event log.</p><p><a href="/">Back to the overview</a></p>',
            q=query,
        )
        return page(f"Trace: {query}", body)
    blocks = []
    for trace in traces:
        first = trace.first
        to = first.get("to") or []
        events = join(
            render(
                '<tr><td class="nowrap" data-label="When">{at}</td>'
                '<td data-label="Event">{kind}</td>'
                '<td class="mono" data-label="Details">{fields}</td></tr>',
                at=_when(datetime.fromtimestamp(float(e["at"]), UTC)),
                kind=e["kind"],
                fields=_fields(e),
            )
            for e in trace.events
        )
        blocks.append(
            render(
                """<section><h2 class="mono">{qid}: {status}</h2>
<dl class="settings"><dt>From</dt><dd class="mono">{sender}</dd><dt>To</dt>
<dd class="mono">{to}</dd><dt>Message-ID</dt><dd class="mono">{mid}</dd></dl>
<div class="scroll"><table class="stack"><thead><tr><th>When (UTC)</th><th>Event</th>
<th>Details</th></tr></thead><tbody>{events}</tbody></table></div></section>""",
                qid=trace.qid,
                status=trace.status,
                sender=first.get("mail_from", ""),
                to=", ".join(to if isinstance(to, list) else [str(to)]),
                mid=first.get("message_id", ""),
                events=events,
            )
        )
    body = render(
        '<h1>Trace: <span class="mono">{q}</span></h1>'
        '<p><a href="/">Back to the overview</a></p>{blocks}',
        q=query,
        blocks=join(blocks, "\n"),
    )
    return page(f"Trace: {query}", body)


def _fields(event: dict[str, object]) -> str:
    return " ".join(f"{k}={v}" for k, v in event.items() if k not in ("at", "kind"))


# --- words ------------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _when(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _age(delta: timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"

"""The one way HTML is written: every value is escaped unless it is already `Html`.

Owns: `Html` (markup we wrote), `render(template, **values)` (str.format syntax; each value is
escaped with `html.escape(quote=True)` unless it is `Html`), and `join`. Everything that comes
from mail or users (subjects, addresses, logins, queries) reaches a page through `render`, so a
page cannot forget to escape one value; markup is only ever our own template text.
Must not: read anything, or mark text from outside as `Html` (only templates and `render`'s
results are `Html`).

Why not a template library (Jinja2 with autoescape): the pages are a handful of small
fragments, and this is the same rule in thirty lines with no dependency to keep up to date.
"""

from __future__ import annotations

import html
import string
from collections.abc import Iterable
from typing import Any


class Html(str):
    """Markup that is already safe: a template of ours, or the result of `render`."""

    __slots__ = ()


class _Escaping(string.Formatter):
    def format_field(self, value: Any, format_spec: str) -> str:
        if isinstance(value, Html):
            return value
        return html.escape(format(value, format_spec), quote=True)

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> Any:
        # Plain names only: a template must not reach into an object's attributes ({x.y},
        # {x[0]}); that keeps what a template can show to what its caller handed it.
        if not field_name.isidentifier():
            raise ValueError(f"template field {field_name!r}: plain names only")
        return super().get_field(field_name, args, kwargs)

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion is not None:
            raise ValueError("template fields take no conversion (!r, !s)")
        return value


_FORMATTER = _Escaping()


def render(template: str, **values: Any) -> Html:
    """`template` (ours) with each {name} replaced by the escaped value (Html kept as is)."""
    return Html(_FORMATTER.vformat(template, (), values))


def join(parts: Iterable[Html], separator: str = "") -> Html:
    """Fragments joined; every part must already be Html (rendered)."""
    out = []
    for part in parts:
        if not isinstance(part, Html):
            raise TypeError("join() takes rendered Html only")
        out.append(part)
    return Html(separator.join(out))


def page(title: str, body: Html) -> Html:
    """A whole document: language, viewport for phones, our style sheet, `title` escaped."""
    return render(_PAGE, title=title, body=body, style=Html(STYLE))


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
{body}
</body>
</html>
"""

# One small style sheet, inline (the Content-Security-Policy allows inline styles and nothing
# else): readable text at any width, tables that scroll sideways on a phone instead of
# making the page wider, visible focus for keyboard users.
STYLE = """
:root{color-scheme:light dark;--fg:#1a1a1a;--bg:#fff;--mute:#5a5a5a;--line:#ccc;--accent:#0b57d0}
@media (prefers-color-scheme:dark){:root{--fg:#eee;--bg:#121212;--mute:#aaa;--line:#444;
--accent:#8ab4f8}}
body{font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);
background:var(--bg);margin:0 auto;padding:1rem;max-width:60rem}
h1{font-size:1.5rem;margin:.5rem 0 1rem}h2{font-size:1.2rem;margin:1.5rem 0 .5rem}
a{color:var(--accent)}a:focus,input:focus,button:focus{outline:3px solid var(--accent);
outline-offset:2px}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;width:100%;margin:.5rem 0}
th,td{text-align:left;padding:.35rem .5rem;border-bottom:1px solid var(--line);
vertical-align:top;overflow-wrap:anywhere}
th{font-weight:600;white-space:nowrap}td.nowrap{white-space:nowrap}
@media (max-width:40rem){table.stack thead{position:absolute;width:1px;height:1px;
overflow:hidden;clip-path:inset(50%)}
table.stack tr{display:block;border-bottom:1px solid var(--line);padding:.4rem 0}
table.stack td{display:grid;grid-template-columns:6.5rem 1fr;gap:.75rem;border:0;
padding:.1rem 0}
table.stack td::before{content:attr(data-label);font:600 1rem/1.5 system-ui,sans-serif}}
/* a phone scrolls the chart sideways, starting at its right end: the latest hours */
.chart{direction:rtl}.chart svg{min-width:34rem;direction:ltr}figure{margin:0}
dl.settings{display:grid;grid-template-columns:max-content 1fr;gap:.25rem 1rem}
dl.settings dt{font-weight:600}dl.settings dd{margin:0;overflow-wrap:anywhere}
@media (max-width:30rem){dl.settings{grid-template-columns:1fr}dl.settings dd{margin-bottom:.5rem}}
.server{border:1px solid var(--line);border-radius:.5rem;padding:.75rem 1rem;margin:.75rem 0}
.note{color:var(--mute)}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
overflow-wrap:anywhere}
.figures{display:flex;flex-wrap:wrap;gap:.5rem 1.5rem;padding:0;list-style:none}
svg{max-width:100%;height:auto}
form{margin:1rem 0}input[type=text],input[type=email]{font:inherit;padding:.3rem;
max-width:100%}
button{font:inherit;padding:.3rem .8rem}
"""

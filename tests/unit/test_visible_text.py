"""Issue #11, class 8: one rule for showing client-chosen text (logs, the operator's terminal)
and ASCII reply text, checked over everything replies.py defines."""

from __future__ import annotations

import inspect
import logging

from hypothesis import given
from hypothesis import strategies as st

from mailgate import log as mglog
from mailgate import replies
from mailgate.text import visible


def test_visible_escapes_controls_separators_and_format_characters() -> None:
    assert visible("plain text: ok") == "plain text: ok"
    assert visible("\x1b[2J\x07") == "\\x1b[2J\\x07"
    assert visible("a\r\nb\u2028c\u2029d\x85e") == "a\\x0d\\x0ab\\u2028c\\u2029d\\x85e"
    assert visible("\u202egnp.exe") == "\\u202egnp.exe"
    assert visible("caf\u00e9 \u4e2d\u6587") == "caf\u00e9 \u4e2d\u6587"  # printable stays
    assert visible("\U000e0041") == "\\U000e0041"  # a tag character


@given(st.text())
def test_visible_text_is_one_printable_line(text: str) -> None:
    shown = visible(text)
    assert shown.isprintable()
    assert len(shown.splitlines()) <= 1


def test_the_log_formatter_escapes_every_message_and_keeps_traceback_lines() -> None:
    formatter = mglog.Formatter("%(message)s")
    record = logging.LogRecord("t", logging.INFO, __file__, 1,
                               "from=<%s> ehlo=%s", ("a\u2028b", "x\r\ny"), None)  # fmt: skip
    assert formatter.format(record) == "from=<a\\u2028b> ehlo=x\\x0d\\x0ay"
    try:
        raise ValueError("bad\u2028value")
    except ValueError as e:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", (),
                                   (type(e), e, e.__traceback__))  # fmt: skip
    lines = formatter.format(record).split("\n")
    assert lines[0] == "failed" and lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: bad\\u2028value"


def test_the_service_format_gives_the_standard_formatters_bytes() -> None:
    # log.Formatter writes log._FORMAT out as an f-string and formats a second's time stamp
    # once (issue #19): the lines must stay byte for byte what logging.Formatter makes.
    fast = mglog.Formatter(mglog._FORMAT)
    standard = logging.Formatter(mglog._FORMAT)
    for created in (1796309623.0, 1796309623.0004, 1796309623.9996, 1796309624.5, 0.25):
        for msg, args in (("sid=%s connect client=[%s]:%d", ("0A1B", "192.0.2.1", 25)),
                          ("ehlo=%s", ("x\r\ny\u2028",)), ("plain", ())):  # fmt: skip
            record = logging.LogRecord("mailgate.receive.session", logging.WARNING, __file__, 1,
                                       msg, args, None)  # fmt: skip
            record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
            assert fast.format(record) == visible(standard.format(record))
            assert fast.format(record) != fast.format(logging.makeLogRecord(vars(record) | {
                "created": created + 1.0}))  # the cached second moves on  # fmt: skip


def _all_replies() -> list[replies.Reply]:
    """Every Reply constant in replies.py, and every Reply function called with hostile text."""
    hostile = "r\u00e9sum\u00e9\u2028\x1b[2J\u202e\u4e2d.exe"
    found = []
    for name, value in vars(replies).items():
        if isinstance(value, replies.Reply):
            found.append(value)
        elif inspect.isfunction(value) and value.__module__ == replies.__name__:
            params = inspect.signature(value).parameters
            if name.startswith("_") or not params:
                continue
            args = [7 if p.annotation in ("int", int) else hostile for p in params.values()]
            result = value(*args)
            if isinstance(result, replies.Reply):
                found.append(result)
            else:
                assert isinstance(result, bytes) and result.isascii(), name
    return found


def test_every_reply_is_ascii_and_one_line() -> None:
    every = _all_replies()
    assert len(every) > 50
    for reply in every:
        data = reply.to_bytes()
        assert data.isascii(), reply
        assert data.count(b"\r\n") == 1 and data.endswith(b"\r\n"), reply

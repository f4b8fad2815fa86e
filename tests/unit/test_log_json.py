"""[log] format = "json": one object a line with the text line's fields (log.JsonFormatter)."""

from __future__ import annotations

import json
import logging
import sys

from mailgate.log import JsonFormatter


def record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            info = sys.exc_info()
    return logging.LogRecord("mailgate.deliver", logging.INFO, __file__, 1, msg, args, info)


def test_fields_of_the_text_line_become_members() -> None:
    line = JsonFormatter().format(record(
        'qid=%s to=<%s> relay=%s status=sent reply="%s" reason=%r', "Q1", "b@x.test",
        "mx[192.0.2.1]:25", "250 2.0.0 Ok: queued", "it's a \"test\"",
    ))  # fmt: skip
    assert "\n" not in line
    data = json.loads(line)
    assert data["level"] == "INFO" and data["logger"] == "mailgate.deliver"
    assert data["message"].startswith("qid=Q1 to=<b@x.test>")
    assert data["qid"] == "Q1" and data["to"] == "<b@x.test>" and data["status"] == "sent"
    assert data["reply"] == "250 2.0.0 Ok: queued"
    assert data["relay"] == "mx[192.0.2.1]:25"
    assert set(data) >= {"time", "pid"}


def test_a_field_never_replaces_a_fixed_member_and_tracebacks_stay_on_one_line() -> None:
    data = json.loads(JsonFormatter().format(record("level=evil message=x qid=Q", exc=True)))
    assert data["level"] == "INFO" and data["message"] == "level=evil message=x qid=Q"
    assert data["qid"] == "Q"
    assert "ValueError: boom" in data["exc"]

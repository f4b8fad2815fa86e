"""Every transcript in tests/dialogues/ played against the sans-IO machine (no sockets).

The same files are replayed against the live server by the e2e suite; here the fixed fake
adapter of tests/dialogues/runner.py answers the events. Also checks the runner itself: the
transcript parser and `match_reply`, and that a wrong transcript is caught.
"""

from __future__ import annotations

import pytest

from tests.dialogues.runner import (
    DialogueMismatch,
    Expect,
    Hangup,
    Send,
    StartTlsNow,
    Transcript,
    TranscriptError,
    is_continuation_wildcard,
    load_transcripts,
    match_reply,
    parse_transcript,
    play_against_machine,
)

TRANSCRIPTS = list(load_transcripts())


def test_there_are_enough_transcripts() -> None:
    assert len(TRANSCRIPTS) >= 10
    assert {t.service for t in TRANSCRIPTS} == {"submission", "submissions", "smarthost"}
    assert all(t.description for t in TRANSCRIPTS)


@pytest.mark.parametrize("transcript", TRANSCRIPTS, ids=[t.name for t in TRANSCRIPTS])
def test_transcript(transcript: Transcript) -> None:
    seen = play_against_machine(transcript)
    assert len(seen) == sum(1 for s in transcript.steps if isinstance(s, Expect)) or any(
        is_continuation_wildcard(s.pattern) for s in transcript.steps if isinstance(s, Expect)
    )


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        ("250 *", "250 2.0.0 Ok", True),
        ("250 *", "250 ", True),
        ("250 *", "250-PIPELINING", False),
        ("250-*", "250-PIPELINING", True),
        ("530 5.7.0 *", "530 5.7.0 Must issue a STARTTLS command first", True),
        ("530 5.7.0 *", "530 5.7.1 x", False),
        ("250 2.0.0 *queued as*", "250 2.0.0 Ok: queued as TESTQID", True),
        ("334 ", "334 ", True),
        ("334 ", "334 x", False),
        ("a.c", "abc", False),  # only * is special
        ("*", "", True),
        ("25? *", "250 x", False),
        ("250-${hostname}", "250-mail.example.org", True),
        ("250-${hostname}", "250-", False),
        ("220 ${hostname} ESMTP*", "220 a b ESMTP mailgate", False),
    ],
)
def test_match_reply(pattern: str, text: str, expected: bool) -> None:
    assert match_reply(pattern, text) is expected


def test_parse_transcript() -> None:
    t = parse_transcript(
        "# first line\n# second\nservice smarthost\noption max_errors 3\n"
        "C: EHLO a\nC: NOOP {{x*3}}\nB: \\x41\\r\\n\\0\\\\\nS: 250 *\n\nC: QUIT\nTLS\nHANGUP\n",
        name="t",
    )
    assert t.service == "smarthost" and t.options == {"max_errors": 3}
    assert t.description == "first line second" and t.name == "t"
    assert t.steps == (
        Send(b"EHLO a\r\nNOOP xxx\r\nA\r\n\0\\", 5),
        Expect("250 *", 8),
        Send(b"QUIT\r\n", 10),
        StartTlsNow(11),
        Hangup(12),
    )


@pytest.mark.parametrize(
    "text",
    [
        "C: EHLO a\n",
        "service nosuch\n",
        "service smarthost\nservice smarthost\n",
        "service smarthost\noption colour 3\n",
        "service smarthost\nX: what\n",
        "service smarthost\nB: \\q\n",
    ],
)
def test_bad_transcripts(text: str) -> None:
    with pytest.raises(TranscriptError):
        parse_transcript(text)


@pytest.mark.parametrize(
    "text",
    [
        "service smarthost\nC: NOOP\nS: 251 *\n",  # wrong reply
        "service smarthost\nC: NOOP\n",  # a reply nobody expected
        "service smarthost\nC: NOOP\nS: 250 *\nS: 250 *\n",  # a reply that never comes
        "service smarthost\nC: NOOP\nCLOSED\n",  # the server did not close
        "service smarthost\nS: 221 *\n",  # the greeting is checked when the first step is S:
        "service submission\nC: STARTTLS\nS: 220 *\nTLS\nC: STARTTLS\nS: 220 *\nTLS\n",
    ],
)
def test_wrong_transcripts_are_caught(text: str) -> None:
    with pytest.raises(DialogueMismatch):
        play_against_machine(parse_transcript(text))

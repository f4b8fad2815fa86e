"""How text a client chose is shown to a person: every invisible or line-breaking character made
visible.

Owns: `visible()`, the one rendering of untrusted text for a log line (`mailgate.log` applies it
to every line) and for the operator's terminal (`mailgate queue`). A client controls envelope
addresses (SMTPUTF8 allows almost any character in a quoted local part), EHLO names, logins and
every header; written raw, a line or paragraph separator (U+2028, U+2029, U+0085) starts a fake
log line in some viewers, and an ESC sequence reprograms the operator's terminal.
Must not: import anything from mailgate, or change printable text (greppable logs stay as
they are).
"""

from __future__ import annotations


def visible(text: str) -> str:
    r"""`text` with every character that str.isprintable() rejects written as a Python escape:
    C0 and C1 controls (NUL, CR, LF, ESC, DEL), line and paragraph separators, format
    characters (bidirectional overrides, zero-width ones), spaces other than U+0020, surrogates
    and unassigned code points. '\x1b[2J' stays readable as '\\x1b[2J', U+2028 as '\\u2028'."""
    if text.isprintable():
        return text  # the common case: one C-level scan, no copy
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"

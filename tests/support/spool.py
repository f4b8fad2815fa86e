"""Spool fixtures for tests: damage a stored envelope, write an entry of the older layout.

Owns: what tests do to a spool that the spool itself never does. Must not: be used by src/.
"""

from __future__ import annotations

import os
from pathlib import Path

from mailgate.spool.entry import Envelope
from mailgate.spool.journal import JournalStore
from mailgate.spool.record import UPDATE, encode
from mailgate.spool.segments import Out


def break_envelope(store: JournalStore, qid: str, raw: bytes = b"{broken") -> None:
    """Make the stored envelope of `qid` unparsable, as a disk or a bug might: a whole,
    CRC-correct UPDATE record whose JSON is `raw`."""
    with store.writing():
        head = store.writable_head()
        assert head.magic is not None
        store.append_one(Out(encode(head.magic, UPDATE, qid, raw)))
        with store.mutex:  # this instance reads its own damage back, as any other would
            store.rebuild(repair=False, findings=None)


def write_files_entry(spool: Path, envelope: Envelope, message: bytes) -> None:
    """An entry of the older one-file-per-entry layout (env/<qid>.json, msg/<qid>.eml), as
    mailgate wrote it before the journal, for the importer."""
    for d in ("env", "msg"):
        (spool / d).mkdir(mode=0o700, parents=True, exist_ok=True)
    for path, data in (
        (spool / "msg" / f"{envelope.id}.eml", message),
        (spool / "env" / f"{envelope.id}.json", envelope.to_json()),
    ):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

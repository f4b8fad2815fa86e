"""Read-only importer of the older spool layout: one message file and one envelope file per
entry (spool/msg/<qid>.eml, spool/env/<qid>.json), which mailgate wrote before the journal.

Owns: finding such entries and moving them into the journal at recovery, so that upgrading
loses no queued mail. Must not: write that layout (nothing does any more), or drop an entry it
cannot read: a broken one stays where it is, with a warning, for the operator.

Journal first (fdatasynced), then the files go, envelope before message: a crash in between
imports the same entry again at the next start, and the journal's copy, maybe changed since,
stays the truth (an entry already in the journal only has its files removed).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from mailgate.errors import SpoolError
from mailgate.spool.api import parse_envelope
from mailgate.spool.disk import fsync_dir, unlink_quietly
from mailgate.spool.ids import is_queue_id
from mailgate.spool.record import message_offset
from mailgate.spool.segments import Entry

if TYPE_CHECKING:
    from mailgate.spool.journal import JournalStore

log = logging.getLogger(__name__)


def has_files_entries(spool: Path) -> bool:
    """Whether `spool` holds entries of the older layout waiting to be imported."""
    try:
        return any(n.endswith(".json") for n in os.listdir(spool / "env"))
    except OSError:
        return False


def import_files_format(store: JournalStore) -> int:
    """Move the older layout's entries into the journal; how many. Under the exclusive
    flock, index up to date. Raises OSError."""
    env_dir, msg_dir = store.path / "env", store.path / "msg"
    if not env_dir.is_dir():
        return 0
    imported = 0
    for name in sorted(os.listdir(env_dir)):
        qid = name.removesuffix(".json")
        if not name.endswith(".json") or not is_queue_id(qid):
            continue
        env_path, msg_path = env_dir / name, msg_dir / f"{qid}.eml"
        if qid in store.index.entries:  # imported before a crash; the journal is newer
            unlink_quietly(env_path)
            unlink_quietly(msg_path)
            continue
        raw = env_path.read_bytes()
        try:
            parse_envelope(qid, raw)
            src = os.open(msg_path, os.O_RDONLY | os.O_CLOEXEC)
        except (SpoolError, FileNotFoundError) as e:
            log.warning("qid=%s spool recovery: files-format entry left in place: %s", qid, e)
            continue
        try:
            length = os.fstat(src).st_size
            out = store.commit_from(store.writable_head(), qid, raw, (), src, 0, length)
            seg, where = store.append_one(out)
        finally:
            os.close(src)
        offset = message_offset(where, qid, raw)
        with store.mutex:
            store.index.add(qid, seg, Entry(seg.seq, offset, length, offset - where + length, raw))
        env_path.unlink()  # env first: a msg without env is never imported
        msg_path.unlink()
        imported += 1
    if imported:
        fsync_dir(env_dir)
        fsync_dir(msg_dir)
        log.info("spool recovery: imported %d files-format entries into the journal", imported)
    return imported

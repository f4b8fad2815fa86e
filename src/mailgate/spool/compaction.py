"""Compaction of the journal: giving back the space of delivered entries.

Owns: the policy of when a segment is copied forward and deleted, and doing it safely. Must
not: change what any entry holds (a copy carries the current envelope and the same bytes).

Only the oldest segment is ever deleted, once no current entry lives in it (removed, or
copied forward), so its REMOVE records protect nothing older. When its live entries are a
small share of it (or dead bytes dominate the journal) they are copied forward as COMMITs with
the current envelope into the head and fdatasynced; then the segment is unlinked and the
directory fsynced, one segment at a time. A crash anywhere in between leaves either the old
records alone or both copies, and the newer COMMIT wins (record.py: the last record of a qid).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mailgate.errors import SpoolError
from mailgate.spool.disk import fsync_dir
from mailgate.spool.record import message_offset
from mailgate.spool.segments import Entry, Segment

if TYPE_CHECKING:
    from mailgate.spool.journal import JournalStore

log = logging.getLogger(__name__)

_CHEAP_SHARE = 4  # copy forward when live bytes are at most 1/4 of the oldest segment


def compact(store: JournalStore) -> int:
    """Delete as many of the oldest segments as the policy allows; how many. Under the
    exclusive flock, index up to date (`store.writing()`). Raises OSError."""
    index = store.index
    deleted = 0
    for _ in range(len(index.segments)):  # bounded: one segment per pass
        if len(index.segments) < 2:
            break
        oldest = index.oldest()
        if oldest.magic is None:
            break  # unreadable: never delete it here; recover() moves it to corrupt/
        if oldest.live:
            total = sum(s.end for s in index.segments.values())
            live = sum(s.live_bytes for s in index.segments.values())
            # Copy forward when little lives here, or when dead bytes dominate the journal
            # (bounds the disk a long-deferred backlog can pin to about twice its size).
            cheap = oldest.live_bytes * _CHEAP_SHARE <= oldest.end
            if not cheap and total <= 2 * live + 2 * store.segment_size:
                break
            _copy_forward(store, oldest)
        _delete_segment(store, oldest)
        deleted += 1
    return deleted


def compact_quietly(store: JournalStore) -> None:
    """After a removal or an update that already succeeded (still under the flock): a
    failure here is logged only."""
    if len(store.index.segments) < 2:
        return
    try:
        compact(store)
    except (OSError, SpoolError) as e:
        log.warning("spool journal compaction failed: %s", e)


def _copy_forward(store: JournalStore, seg: Segment) -> None:
    assert seg.fd is not None
    with store.mutex:
        moving = store.index.where(seg.seq)
    head = store.writable_head()
    start = head.end
    outs = [
        store.commit_from(head, qid, entry.raw, (), seg.fd, entry.offset, entry.length)
        for qid, entry in moving
    ]
    written = store.write_outs(head, outs)
    failed = next((w for w in written if isinstance(w, OSError)), None)
    if failed is not None:
        store.truncate(head, start)
        raise failed
    store.sync(head, start)
    with store.mutex:
        for (qid, entry), out, where in zip(moving, outs, written, strict=True):
            assert isinstance(where, int)
            offset = message_offset(where, qid, entry.raw)
            copy = Entry(head.seq, offset, entry.length, out.size, entry.raw, entry.envelope)
            store.index.add(qid, head, copy)
    log.info("spool journal: copied %d entries forward from %s", len(moving), seg.path.name)


def _delete_segment(store: JournalStore, seg: Segment) -> None:
    seg.path.unlink()
    # Durable before the next deletion: if this segment came back after a crash while a
    # newer one holding its REMOVE records did not, removed entries would come back.
    fsync_dir(store.journal_dir)
    with store.mutex:
        store.index.forget_segment(seg)
    log.debug("spool journal: deleted %s", seg.path.name)

"""Recovery of the journal at startup: what an interrupted run (kill -9, power cut) left.

Owns: the order of the startup repairs and keeping damage for the operator in spool/corrupt/.
Must not: drop a whole record, keep a torn one, or bring back a removed entry.

recover() empties tmp/ (messages being received when we stopped; their senders never got
250); re-reads the whole journal, cutting a torn append at the end of a segment (never
acknowledged); copies a segment with damaged records to corrupt/ (what parses stays in use);
writes an entry whose envelope does not parse out to corrupt/ (as <qid>.json and <qid>.eml)
and removes it; imports a spool of the older one-file-per-entry layout (files_import.py);
then compacts. Only what changed is fsynced, so a clean start costs no fsync.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from mailgate.errors import SpoolError
from mailgate.spool import compaction, files_import
from mailgate.spool.api import RecoveryReport
from mailgate.spool.disk import (
    FILE_MODE,
    copy_range,
    empty_tmp,
    free_name,
    fsync_dir,
    is_prefix_of,
    pread_exact,
    spool_error,
    write_new_file,
)
from mailgate.spool.segments import Findings, Segment

if TYPE_CHECKING:
    from mailgate.spool.journal import JournalStore

log = logging.getLogger(__name__)

_COPIES = 1000  # earlier copies of one damaged segment looked at, as free_name() bounds them


def recover(store: JournalStore) -> RecoveryReport:
    """Repair what an interrupted run left behind (call before serving)."""
    try:
        tmp_removed = empty_tmp(store.tmp_dir)
        findings = Findings()
        with store.flock(fcntl.LOCK_EX):
            with store.mutex:
                store.rebuild(repair=True, findings=findings)
            for seq in sorted(findings.damaged):
                _keep_damaged(store, store.index.segments[seq])
            corrupt = _export_corrupt(store)
            files_import.import_files_format(store)
            compaction.compact(store)
        # Only what changed: segments deleted or cut were made durable as that happened.
        if tmp_removed:
            fsync_dir(store.tmp_dir)
        if findings.damaged or corrupt:
            fsync_dir(store.corrupt_dir)
            fsync_dir(store.journal_dir)
    except OSError as e:
        raise spool_error(e, f"spool recovery in {store.path}") from None
    report = RecoveryReport(
        len(store.index.entries), tmp_removed, tuple(findings.orphans), tuple(corrupt)
    )
    log.debug("spool recovery %s", report)
    return report


def _keep_damaged(store: JournalStore, seg: Segment) -> None:
    """Keep a damaged segment for the operator: a copy in corrupt/ (what parses stays in
    use), or, when not even its header reads, the segment itself (the head is copied
    instead; a writer then starts a new segment after it: see writable_head)."""
    if seg.magic is None and seg is not store.index.head():
        target = free_name(store.corrupt_dir, seg.path.name)
        os.rename(seg.path, target)
        with store.mutex:
            store.index.forget_segment(seg)
        log.error("spool journal: unreadable segment moved to %s", target)
        return
    _keep_copy(store.corrupt_dir, seg.path)


def _keep_copy(corrupt_dir: Path, path: Path) -> None:
    """Copy a damaged segment to corrupt/, unless an earlier startup did (a copy that is a
    prefix of it: the segment has only grown since)."""
    size = os.stat(path).st_size
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for n in range(_COPIES):
            earlier = corrupt_dir / (path.name if n == 0 else f"{path.name}.{n}")
            if not earlier.exists():
                break
            if is_prefix_of(earlier, src, size):
                return
        target = free_name(corrupt_dir, path.name)
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            copy_range(src, dst, 0, size)
            os.fsync(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    log.error("spool journal: damaged segment copied to %s", target)


def _export_corrupt(store: JournalStore) -> list[str]:
    """Entries whose envelope does not parse (or names another id): to corrupt/, removed."""
    bad: list[str] = []
    with store.mutex:
        for qid, entry in sorted(store.index.entries.items()):
            try:
                store.envelope_of(qid, entry)
            except SpoolError as e:
                log.warning("qid=%s spool recovery: moved to corrupt/: %s", qid, e)
                bad.append(qid)
    for qid in bad:
        entry = store.index.entries[qid]
        seg = store.index.segments[entry.segment]
        assert seg.fd is not None
        message = pread_exact(seg.fd, entry.length, entry.offset)
        write_new_file(free_name(store.corrupt_dir, f"{qid}.json"), entry.raw, None)
        write_new_file(free_name(store.corrupt_dir, f"{qid}.eml"), message, None)
        store.append_one(store.remove_record(store.writable_head(), qid))
        with store.mutex:
            store.index.drop(qid)
    return bad

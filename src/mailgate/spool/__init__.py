"""The durable spool: the hand-off point between receiving and delivery.

Owns: choosing the backend that [spool] format names: "files" (store.py, a message file and an
envelope file per entry) or "journal" (journal.py, records appended to log segments). Both
keep the same durability contract and the same `Store` API. Must not: touch spool files
itself beyond looking at which layout a spool directory has.

Switching format keeps queued mail: the journal backend imports a files-format spool's entries
at startup (`JournalStore.recover()`); the files backend cannot read a journal, so opening it
on a spool whose journal still holds entries is refused rather than silently ignoring them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mailgate.config import SpoolConfig
from mailgate.errors import SpoolError
from mailgate.spool.journal import JournalStore
from mailgate.spool.store import Store

log = logging.getLogger(__name__)


def open_store(cfg: SpoolConfig) -> Store:
    """The spool backend that [spool] names (a JournalStore is a Store to its users)."""
    if cfg.format == "journal":
        if _has_files_entries(cfg.path):
            log.warning(
                "spool %s holds files-format entries (env/); `mailgate serve` moves them "
                "into the journal at startup",
                cfg.path,
            )
        return JournalStore(cfg.path)
    if (cfg.path / "journal").is_dir() and JournalStore(cfg.path).ids():
        raise SpoolError(
            f'spool.format: {cfg.path} holds queued entries in a journal; set format = "journal"'
        )
    return Store(cfg.path)


def spool_exists(cfg: SpoolConfig) -> bool:
    """Whether cfg.path holds a spool (of either format). `mailgate queue` refuses to conjure
    up an empty one from a mistyped path."""
    return (cfg.path / "env").is_dir() or (cfg.path / "journal").is_dir()


def _has_files_entries(path: Path) -> bool:
    try:
        return any(n.endswith(".json") for n in os.listdir(path / "env"))
    except OSError:
        return False

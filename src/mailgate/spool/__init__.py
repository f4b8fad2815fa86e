"""The durable spool: the hand-off point between receiving and delivery.

Owns: building the spool (`open_store()`) and saying whether a folder holds one. Every stage
is typed against `spool.api.SpoolStore`; its one implementation is the journal
(`spool.journal.JournalStore`). Must not: touch spool files itself beyond looking at which
layout a spool directory has.

Upgrading keeps queued mail: a spool of the older one-file-per-entry layout (env/ and msg/)
is imported into the journal at startup (`recover()`, spool/files_import.py).
"""

from __future__ import annotations

import logging

from mailgate.config import SpoolConfig
from mailgate.spool.api import SpoolStore
from mailgate.spool.files_import import has_files_entries
from mailgate.spool.journal import JournalStore

log = logging.getLogger(__name__)


def open_store(cfg: SpoolConfig) -> SpoolStore:
    """The spool at cfg.path."""
    if has_files_entries(cfg.path):
        log.warning(
            "spool %s holds entries of the older files layout (env/); `mailgate serve` moves "
            "them into the journal at startup",
            cfg.path,
        )
    return JournalStore(cfg.path)


def spool_exists(cfg: SpoolConfig) -> bool:
    """Whether cfg.path holds a spool (of either layout). `mailgate queue` refuses to conjure
    up an empty one from a mistyped path."""
    return (cfg.path / "env").is_dir() or (cfg.path / "journal").is_dir()

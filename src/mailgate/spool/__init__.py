"""The durable spool: the hand-off point between receiving and delivery (see store.py)."""

from __future__ import annotations

from mailgate.config import SpoolConfig
from mailgate.spool.store import Store


def open_store(cfg: SpoolConfig) -> Store:
    """The spool backend that [spool] names."""
    return Store(cfg.path)

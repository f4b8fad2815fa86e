"""The compromised-account breaker's clean-up: suspend the login and hold its queued mail.

Owns: `suspend_account`, what the caller does with a `BreakerTrip` from `Limits.record_message`.
Must not: decide when to trip (that is `limits.rate`), deliver, delete or rewrite mail (held
entries wait for an operator: `mailgate queue release` or `delete`), or use anything of the
directory and the spool but `set_suspended`, `ids`, `load` and `hold`.

Blocking I/O (SQLite, spool files): from asyncio, run it with asyncio.to_thread. `mailgate user
enable LOGIN` clears the suspension; held entries are released one by one with `mailgate queue
release ID` once the operator has looked at them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from mailgate.errors import DirectoryError, SpoolError
from mailgate.limits.keys import login_key, printable

log = logging.getLogger(__name__)


class SuspendingDirectory(Protocol):
    """The one directory method the breaker needs (directory.Directory has it)."""

    def set_suspended(self, login: str, suspended: bool) -> None: ...


class QueuedEntry(Protocol):
    """What the breaker reads of a spooled entry (spool.entry.Envelope has it)."""

    @property
    def login(self) -> str: ...
    @property
    def held(self) -> bool: ...
    @property
    def pending(self) -> Sequence[object]: ...


class HoldingStore(Protocol):
    """The spool methods the breaker needs (spool.api.SpoolStore has them)."""

    def ids(self) -> Iterable[str]: ...
    def load(self, qid: str) -> QueuedEntry: ...
    def hold(self, qid: str) -> object: ...


@dataclass(frozen=True, slots=True)
class Suspension:
    """What suspend_account did.

    suspended: the directory accepted set_suspended (False: it raised DirectoryError, logged).
    held:      queue ids this call put on hold (entries already held are not repeated).
    """

    login: str
    reason: str
    suspended: bool
    held: tuple[str, ...]


def suspend_account(
    directory: SuspendingDirectory, store: HoldingStore, login: str, reason: str
) -> Suspension:
    """Suspend `login` and hold its pending spool entries; log `ALERT account suspended`.

    The account is suspended first, so no new AUTH succeeds while the queue is being walked.
    Entries are matched on Envelope.login, case-insensitively like logins; an entry that
    disappears (delivered) or cannot be read while we walk is skipped, and a failure to
    suspend does not stop the holding: stopping the mail matters most.
    """
    suspended = True
    try:
        directory.set_suspended(login, True)
    except DirectoryError as e:
        suspended = False
        log.error("account suspend failed login=%s error=%s", printable(login), e)
    wanted = login_key(login)
    held: list[str] = []
    for qid in list(store.ids()):
        try:
            envelope = store.load(qid)
            if envelope.held or not envelope.pending or login_key(envelope.login) != wanted:
                continue
            store.hold(qid)
        except SpoolError as e:  # includes NotFound: delivered or deleted meanwhile
            log.warning("qid=%s breaker hold skipped login=%s error=%s", qid, printable(login), e)
            continue
        held.append(qid)
        log.warning("qid=%s held by breaker login=%s", qid, printable(login))
    log.critical(
        "ALERT account suspended login=%s reason=%s suspended=%s held=%d",
        printable(login),
        printable(reason),
        "yes" if suspended else "FAILED",
        len(held),
    )
    return Suspension(login=login, reason=reason, suspended=suspended, held=tuple(held))

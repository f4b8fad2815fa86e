"""The only code that touches spool files.

Owns: the spool directory, its layout, the commit order, per-entry locking and crash recovery.
Must not: parse or change message bytes, decide delivery, or talk to the network.

Layout (docs/ARCHITECTURE.md):
  spool/tmp/             being received; emptied at startup
  spool/msg/<qid>.eml    message bytes as they will be sent; immutable after commit
  spool/env/<qid>.json   envelope and per-recipient state; its existence means "committed"
  spool/corrupt/         entries that failed to load; kept for the operator, never auto-deleted
  spool/wakeup           touched by hold/release/delete/flush; a running engine polls its mtime

Durability contract (RFC 5321 §6.1: once "250" is sent, the message must not be lost):
commit() writes and fsyncs the message (and the envelope) in tmp/, renames the message into msg/,
then the envelope into env/, fsyncs both directories, and only then returns. Files in tmp/ count
for nothing, so the only orders that matter are: both files durable before the envelope's
rename, the message renamed before the envelope. ENOSPC, EDQUOT and EFBIG raise SpoolFull
(answered 452 4.3.1) and leave nothing in msg/ or env/; any other OS error raises SpoolError.
`commit_batch()` does the same for several entries, fsyncs their files concurrently (a
journaling file system folds overlapping fsyncs into one journal commit) and each directory
once; spool/group.py uses it.

Every change to a committed entry (update, hold, release, flush, remove) runs under
fcntl.flock on the entry's env file, so the delivery engine and `mailgate queue` may work on the
same spool at the same time, whether or not the server is running. The env file is replaced by
rename, so a locker checks after flock() that the path still names the inode it locked.
Files are 0600, directories 0700.
"""

from __future__ import annotations

import errno
import fcntl
import io
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Literal

from mailgate.errors import SpoolError, SpoolFull, UsageError
from mailgate.spool.entry import Envelope, utcnow
from mailgate.spool.ids import is_queue_id, new_queue_id

log = logging.getLogger(__name__)

MEMORY_LIMIT = 256 * 1024  # an Incoming keeps up to this much in memory, then spills to tmp/
_CHUNK = 1024 * 1024  # read/copy block size: bounded memory for 50 MB messages
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_LOCK_ATTEMPTS = 1000  # each retry means another process replaced the file between open and flock
_ID_ATTEMPTS = 100  # fresh ids to try when one is already on disk (practically never)
_HEADER_LIMIT = 256 * 1024
_FSYNC_WORKERS = 16  # concurrent fsyncs within one batch
# What Envelope.from_json raises on malformed JSON or a JSON value of the wrong shape.
_PARSE_ERRORS = (ValueError, KeyError, TypeError, AttributeError)
_FILE_MODE = 0o600
_DIR_MODE = 0o700


class NotFound(SpoolError):
    """No committed entry has this queue id."""


def _spool_error(e: OSError, what: str) -> SpoolError:
    """ENOSPC/EDQUOT/EFBIG mean "no room" (452 4.3.1); everything else is an internal error."""
    text = f"{what}: {e.strerror or e}"
    if e.errno in _FULL_ERRNOS:
        return SpoolFull(text)
    return SpoolError(text)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    # Bounded: every os.write either makes progress or raises.
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, _CHUNK):
        parts.append(chunk)
    return b"".join(parts)


def _fsync_dir(path: Path) -> None:
    """Make renames and unlinks in `path` durable (the name, not just the data)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as e:  # cleanup must never hide the error that made us clean up
        log.warning("spool cleanup failed path=%s error=%s", path, e.strerror)


# --- a message being received --------------------------------------------------


def _empty_tmp(tmp_dir: Path) -> int:
    """Recovery: remove what was being received when the server stopped; how many files."""
    removed = 0
    for p in sorted(tmp_dir.iterdir()):
        if p.is_dir() and not p.is_symlink():
            log.warning("spool recovery: leaving unexpected directory %s", p)
            continue
        p.unlink()
        removed += 1
    return removed


def _make_spool_dirs(path: Path, dirs: Sequence[Path]) -> tuple[int, int] | None:
    """Create the spool folders (0700) and return the owner new files must get.

    `mailgate queue` run as root must not leave root-owned 0600 files that a server running as
    an unprivileged user could no longer read: new files then take the spool's owner.
    """
    try:
        for d in (path, *dirs):
            if not d.is_dir():
                d.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
                os.chmod(d, _DIR_MODE)  # mkdir's mode is filtered by the umask
        st = os.stat(path)
    except OSError as e:
        raise _spool_error(e, f"spool {path}") from None
    if os.geteuid() == 0 and st.st_uid != 0:
        return (st.st_uid, st.st_gid)
    return None


class Incoming:
    """A message being received: kept in memory up to MEMORY_LIMIT, then spilled to spool/tmp/.

    Made by `Store.begin()`; consumed by `Store.commit()` or discarded by `abort()`. After a
    write error the object is failed: later writes and commit() raise the same error again, so
    a session may keep reading DATA to its end and answer once.

    States: open (write, read, abort) -> claimed (handed to a commit, possibly in another
    thread: abort() is now a no-op, so a session's cleanup cannot pull files from under it)
    -> done (committed or aborted).
    """

    def __init__(self, qid: str, tmp_dir: Path, owner: tuple[int, int] | None) -> None:
        self.qid = qid
        self.size = 0
        self._tmp_dir = tmp_dir
        self._owner = owner
        self._buffer: bytearray | None = bytearray()
        self._fd: int | None = None
        self._error: SpoolError | None = None
        self._state: Literal["open", "claimed", "done"] = "open"

    @property
    def spill_path(self) -> Path:
        return self._tmp_dir / f"{self.qid}.data"

    @property
    def is_spilled(self) -> bool:
        return self._buffer is None

    @property
    def is_open(self) -> bool:
        """Neither handed to a commit nor aborted: it may be written and read."""
        return self._state == "open"

    def write(self, data: bytes) -> None:
        """Append message bytes; may raise SpoolFull or SpoolError."""
        self._check_usable()
        if not data:
            return
        try:
            if self._buffer is not None and len(self._buffer) + len(data) <= MEMORY_LIMIT:
                self._buffer += data
            else:
                if self._buffer is not None:
                    self._spill()
                assert self._fd is not None
                _write_all(self._fd, data)
        except OSError as e:
            error = _spool_error(e, f"qid={self.qid} writing message")
            self._fail(error)
            raise error from None
        self.size += len(data)

    def replace(self, data: bytes) -> None:
        """Replace the whole message so far (accept.py drops a header the client sent);
        may raise SpoolFull or SpoolError."""
        self._check_usable()
        self._release()
        self.size = 0
        self.write(data)

    def getvalue(self) -> bytes:
        """The whole message so far (reads back a spilled file)."""
        self._check_usable()
        if self._buffer is not None:
            return bytes(self._buffer)
        try:
            with open(self.spill_path, "rb") as f:
                return f.read()
        except OSError as e:
            raise _spool_error(e, f"qid={self.qid} reading message") from None

    def open_reader(self) -> BinaryIO:
        """A binary stream over the message so far, for scanning without holding it in memory."""
        self._check_usable()
        if self._buffer is not None:
            return io.BytesIO(bytes(self._buffer))
        try:
            return open(self.spill_path, "rb")
        except OSError as e:
            raise _spool_error(e, f"qid={self.qid} reading message") from None

    def abort(self) -> None:
        """Discard the message. Idempotent, and a no-op once handed to a commit."""
        if self._state == "open":
            self._release()
            self._state = "done"

    def __enter__(self) -> Incoming:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()

    # -- used by Store ---------------------------------------------------------

    def _check_usable(self) -> None:
        if self._state != "open":
            raise UsageError(f"qid={self.qid}: incoming message already committed or aborted")
        if self._error is not None:
            raise self._error

    def _spill(self) -> None:
        buffer = self._buffer
        assert buffer is not None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self._fd = os.open(self.spill_path, flags, _FILE_MODE)
        self._buffer = None  # from here on the file exists, and _release() must remove it
        if self._owner is not None:
            os.fchown(self._fd, *self._owner)
        _write_all(self._fd, buffer)

    def _fail(self, error: SpoolError) -> None:
        # Free the disk space now: a full disk is shared by every session.
        self._release()
        self._error = error

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _release(self) -> None:
        self._close_fd()
        if self._buffer is None:
            _unlink_quietly(self.spill_path)
        self._buffer = bytearray()

    def _claim(self) -> None:
        """Hand over to a commit; from here on only the store touches the files."""
        if self._state != "open":
            raise UsageError(f"qid={self.qid}: incoming message already committed or aborted")
        self._state = "claimed"


# --- the store ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What `Store.recover()` found and did at startup.

    entries:           committed entries that load (what the engine will work on).
    tmp_removed:       files removed from tmp/ (messages being received when we stopped).
    orphans_removed:   queue ids whose msg/ had no env/ (interrupted commits, never acknowledged).
    moved_to_corrupt:  queue ids moved to corrupt/ (env without msg, or unparsable env).
    """

    entries: int = 0
    tmp_removed: int = 0
    orphans_removed: tuple[str, ...] = ()
    moved_to_corrupt: tuple[str, ...] = ()

    def __str__(self) -> str:
        """key=value, for the startup log line."""
        corrupt = ",".join(self.moved_to_corrupt) or "-"
        return (
            f"entries={self.entries} tmp_removed={self.tmp_removed}"
            f" orphans_removed={len(self.orphans_removed)} moved_to_corrupt={corrupt}"
        )


@dataclass(slots=True)
class _Staged:
    """One entry of a batch whose two files are written in tmp/; `fds` still need an fsync."""

    stored: Envelope
    msg_tmp: Path
    env_tmp: Path
    fds: list[int]

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)

    def discard(self) -> None:
        self.close()
        _unlink_quietly(self.msg_tmp)
        _unlink_quietly(self.env_tmp)


_pool: tuple[int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def _fsync_pool() -> ThreadPoolExecutor:
    """Threads for concurrent fsyncs (which release the GIL); made again after a fork."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(_FSYNC_WORKERS, "spool-fsync"))
        return _pool[1]


def _fsync_or_error(fd: int) -> OSError | None:
    try:
        os.fsync(fd)
    except OSError as e:
        return e
    return None


class Store:
    """The spool directory. Safe to use from several threads and several processes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tmp_dir = self.path / "tmp"
        self.msg_dir = self.path / "msg"
        self.env_dir = self.path / "env"
        self.corrupt_dir = self.path / "corrupt"
        self.wakeup_path = self.path / "wakeup"
        self._owner = _make_spool_dirs(
            self.path, (self.tmp_dir, self.msg_dir, self.env_dir, self.corrupt_dir)
        )

    # -- paths ----------------------------------------------------------------------

    def message_path(self, qid: str) -> Path:
        return self.msg_dir / f"{self._checked(qid)}.eml"

    def envelope_path(self, qid: str) -> Path:
        return self.env_dir / f"{self._checked(qid)}.json"

    @staticmethod
    def _checked(qid: str) -> str:
        # Ids come from the command line too: never let one name a path outside the spool.
        if not is_queue_id(qid):
            raise NotFound(f"no such queue entry: {qid}")
        return qid

    # -- startup ----------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Repair what an interrupted run left behind (call before serving, with no writers).

        tmp/ is emptied; an env without its msg, or an env that does not parse, moves to
        corrupt/ (with its msg, if any); a msg without its env is deleted (its commit never
        finished, so its sender never got 250 and still owns the message).
        """
        try:
            tmp_removed = _empty_tmp(self.tmp_dir)
            corrupt: list[str] = []
            entries = 0
            for qid in self.ids():
                env_path, msg_path = self.envelope_path(qid), self.message_path(qid)
                reason = ""
                if not msg_path.exists():
                    reason = "envelope without message"
                else:
                    try:
                        envelope = Envelope.from_json(env_path.read_bytes())
                        if envelope.id != qid:
                            reason = f"envelope names id {envelope.id!r}"
                    except _PARSE_ERRORS as e:
                        reason = f"unparsable envelope ({type(e).__name__})"
                if reason:
                    log.warning("qid=%s spool recovery: moved to corrupt/: %s", qid, reason)
                    self._move_to_corrupt(env_path)
                    self._move_to_corrupt(msg_path)
                    corrupt.append(qid)
                else:
                    entries += 1
            orphans: list[str] = []
            for p in sorted(self.msg_dir.iterdir()):
                qid = p.name.removesuffix(".eml")
                if p.suffix == ".eml" and is_queue_id(qid) and not self.envelope_path(qid).exists():
                    log.warning("qid=%s spool recovery: removed message without envelope", qid)
                    p.unlink()
                    orphans.append(qid)
            for d in (self.tmp_dir, self.msg_dir, self.env_dir, self.corrupt_dir):
                _fsync_dir(d)
        except OSError as e:
            raise _spool_error(e, f"spool recovery in {self.path}") from None
        report = RecoveryReport(entries, tmp_removed, tuple(orphans), tuple(corrupt))
        log.debug("spool recovery %s", report)
        return report

    def _move_to_corrupt(self, path: Path) -> None:
        if not path.exists():
            return
        target = self.corrupt_dir / path.name
        # Never overwrite what an operator has not looked at yet. Bounded: names are finite.
        for n in range(1, 1000):
            if not target.exists():
                break
            target = self.corrupt_dir / f"{path.name}.{n}"
        os.rename(path, target)

    # -- receiving --------------------------------------------------------------------

    def begin(self, qid: str | None = None) -> Incoming:
        """Start receiving a message; its queue id is known from here on (for Received)."""
        if qid is not None:
            if not is_queue_id(qid):
                raise UsageError(f"not a queue id: {qid!r}")
            if self._taken(qid):
                raise SpoolError(f"qid={qid}: queue id already in use")
            return Incoming(qid, self.tmp_dir, self._owner)
        for _ in range(_ID_ATTEMPTS):
            qid = new_queue_id()
            if not self._taken(qid):
                return Incoming(qid, self.tmp_dir, self._owner)
        raise SpoolError("could not allocate a fresh queue id")

    def _taken(self, qid: str) -> bool:
        return (
            (self.env_dir / f"{qid}.json").exists()
            or (self.msg_dir / f"{qid}.eml").exists()
            or (self.tmp_dir / f"{qid}.data").exists()
        )

    def commit(self, incoming: Incoming, envelope: Envelope, prefix: bytes = b"") -> Envelope:
        """Store the message (prefix + received bytes) and its envelope durably.

        `envelope.id` must be `incoming.qid` (or "" to have it filled in). Returns the envelope
        as stored, with `size` set. The incoming message is consumed whatever the outcome.
        """
        result = self.commit_batch([(incoming, envelope, prefix)])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def _claim_batch(
        self, items: Sequence[tuple[Incoming, Envelope, bytes]]
    ) -> tuple[list[Envelope | Exception], list[tuple[int, Incoming, Envelope, bytes]]]:
        """Claim each item's Incoming for this batch (so it cannot be committed twice): the
        results list (a UsageError for an item that cannot be claimed) and the claimed items
        with their index. Shared by both backends' commit_batch."""
        results: list[Envelope | Exception] = [UsageError("not committed")] * len(items)
        claimed: list[tuple[int, Incoming, Envelope, bytes]] = []
        for index, (incoming, envelope, prefix) in enumerate(items):
            try:
                if incoming._state == "open":
                    self.prepare_commit(incoming, envelope)
                elif incoming._state != "claimed":
                    raise UsageError(f"qid={incoming.qid}: already committed or aborted")
            except UsageError as e:
                results[index] = e
                continue
            incoming._state = "done"  # whatever happens next, it cannot be committed twice
            claimed.append((index, incoming, envelope, prefix))
        return results, claimed

    def commit_batch(
        self, items: Sequence[tuple[Incoming, Envelope, bytes]]
    ) -> list[Envelope | Exception]:
        """Commit several entries, fsyncing each file but each directory only once.

        Returns one result per item, in order: the stored envelope or the exception for that
        entry. A failure of one entry's files fails only that entry; a failure to fsync a
        directory is shared, so it fails (and removes) every entry of the batch.
        """
        results, claimed = self._claim_batch(items)

        # 1. Write both files of every entry in tmp/, then fsync them all. Concurrently: a
        # journaling file system folds overlapping fsyncs into one journal commit, which is what
        # makes a batch cheap. Only the fsyncs run in threads: the rest needs the GIL anyway.
        staged: list[_Staged | Exception] = [self._write_entry(*c[1:]) for c in claimed]
        fds = [fd for entry in staged if isinstance(entry, _Staged) for fd in entry.fds]
        if len(fds) > 1:
            errors = list(_fsync_pool().map(_fsync_or_error, fds))
        else:
            errors = [_fsync_or_error(fd) for fd in fds]
        failed = {fd: e for fd, e in zip(fds, errors, strict=True) if e is not None}
        for i, entry in enumerate(staged):
            if not isinstance(entry, _Staged):
                continue
            fsync_error = next((failed[fd] for fd in entry.fds if fd in failed), None)
            if fsync_error is not None:
                entry.discard()
                staged[i] = _spool_error(fsync_error, f"qid={entry.stored.id} commit")
            else:
                entry.close()

        # 2. Rename each message into msg/, then its envelope into env/ (now it is committed).
        renamed: list[tuple[int, Envelope]] = []
        for (index, *_), entry in zip(claimed, staged, strict=True):
            if isinstance(entry, Exception):
                results[index] = entry
                continue
            try:
                self._rename_entry(entry)
            except SpoolError as e:
                results[index] = e
                continue
            renamed.append((index, entry.stored))
            results[index] = entry.stored

        # 3. Make the renames durable: each directory once for the whole batch.
        if renamed:
            try:
                _fsync_dir(self.msg_dir)
                _fsync_dir(self.env_dir)
            except OSError as e:
                dir_error = _spool_error(e, "fsync of spool directories")
                log.error("spool commit failed for %d entries: %s", len(renamed), dir_error)
                for index, stored in renamed:
                    self._unstage(stored.id)
                    results[index] = dir_error
                return results
        for _, stored in renamed:
            log.debug("qid=%s committed size=%d", stored.id, stored.size)
        return results

    def _write_entry(
        self, incoming: Incoming, envelope: Envelope, prefix: bytes
    ) -> _Staged | Exception:
        """Write one entry's message and envelope in tmp/, not yet fsynced; never raises."""
        qid = incoming.qid
        spill = incoming.spill_path
        msg_tmp = self.tmp_dir / f"{qid}.msg"
        env_tmp = self.tmp_dir / f"{qid}.env"
        fds: list[int] = []
        keep_spill = False
        try:
            if incoming._error is not None:
                return incoming._error
            if incoming._fd is not None and not prefix:
                # Nothing to prepend: the spilled file already holds the message as it will
                # be sent; make it durable and rename it rather than copy 50 MB.
                fds.append(incoming._fd)
                incoming._fd = None
                msg_tmp, keep_spill = spill, True
            elif incoming._fd is not None:
                incoming._close_fd()
                fds.append(self._write_new(msg_tmp, prefix, source=spill))
            else:
                fds.append(self._write_new(msg_tmp, prefix, incoming._buffer or b""))
            stored = replace(envelope, id=qid, size=len(prefix) + incoming.size)
            fds.append(self._write_new(env_tmp, stored.to_json()))
            return _Staged(stored, msg_tmp, env_tmp, fds)
        except Exception as e:  # per entry: even a bug in one must not fail its neighbours
            keep_spill = False
            _Staged(envelope, msg_tmp, env_tmp, fds).discard()
            return _spool_error(e, f"qid={qid} commit") if isinstance(e, OSError) else e
        finally:
            incoming._close_fd()
            if not keep_spill:
                _unlink_quietly(spill)
            incoming._buffer = bytearray()  # free the memory of the message now

    def _rename_entry(self, entry: _Staged) -> None:
        qid = entry.stored.id
        msg_path, env_path = self.msg_dir / f"{qid}.eml", self.env_dir / f"{qid}.json"
        try:
            os.rename(entry.msg_tmp, msg_path)
            try:
                os.rename(entry.env_tmp, env_path)
            except OSError:
                _unlink_quietly(msg_path)
                raise
        except OSError as e:
            _unlink_quietly(entry.msg_tmp)
            _unlink_quietly(entry.env_tmp)
            raise _spool_error(e, f"qid={qid} commit") from None

    @staticmethod
    def prepare_commit(incoming: Incoming, envelope: Envelope) -> None:
        """Check a commit's arguments and claim the incoming message for it, in the caller's
        thread (spool/group.py does this before handing the batch to a worker thread).
        Raises UsageError for a foreign envelope id or an incoming already committed/aborted."""
        if envelope.id not in ("", incoming.qid):
            raise UsageError(f"envelope id {envelope.id!r} is not the queue id {incoming.qid!r}")
        incoming._claim()

    def _unstage(self, qid: str) -> None:
        _unlink_quietly(self.env_dir / f"{qid}.json")
        _unlink_quietly(self.msg_dir / f"{qid}.eml")

    def enqueue(self, envelope: Envelope, message: bytes) -> Envelope:
        """Spool a message we generated (a bounce). A non-empty `envelope.id` is used as the id."""
        incoming = self.begin(envelope.id or None)
        try:
            incoming.write(message)
        except BaseException:
            incoming.abort()
            raise
        return self.commit(incoming, envelope)

    # -- reading ------------------------------------------------------------------------

    def ids(self) -> list[str]:
        """Queue ids of committed entries, oldest first (ids sort by time of arrival)."""
        try:
            names = os.listdir(self.env_dir)
        except OSError as e:
            raise _spool_error(e, f"listing {self.env_dir}") from None
        qids = (n.removesuffix(".json") for n in names if n.endswith(".json"))
        return sorted(q for q in qids if is_queue_id(q))

    def load(self, qid: str) -> Envelope:
        """The committed envelope; NotFound if there is none, SpoolError if it does not parse."""
        path = self.envelope_path(qid)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no such queue entry: {qid}") from None
        except OSError as e:
            raise _spool_error(e, f"qid={qid} reading envelope") from None
        return self._parse(qid, raw)

    @staticmethod
    def _parse(qid: str, raw: bytes) -> Envelope:
        try:
            envelope = Envelope.from_json(raw)
        except _PARSE_ERRORS as e:
            raise SpoolError(f"qid={qid}: unreadable envelope ({type(e).__name__})") from None
        if envelope.id != qid:
            raise SpoolError(f"qid={qid}: envelope names id {envelope.id!r}")
        return envelope

    def read_message(self, qid: str) -> bytes:
        try:
            return self.message_path(qid).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no such queue entry: {qid}") from None
        except OSError as e:
            raise _spool_error(e, f"qid={qid} reading message") from None

    def read_headers(self, qid: str, limit: int = _HEADER_LIMIT) -> bytes:
        """The message's header section (up to and excluding the empty line), at most `limit`
        bytes, without reading a large body."""
        try:
            with open(self.message_path(qid), "rb") as f:
                head = f.read(limit)
        except FileNotFoundError:
            raise NotFound(f"no such queue entry: {qid}") from None
        except OSError as e:
            raise _spool_error(e, f"qid={qid} reading message") from None
        if head.startswith(b"\r\n"):
            return b""
        end = head.find(b"\r\n\r\n")
        return head if end < 0 else head[: end + 2]

    # -- changing -----------------------------------------------------------------------

    @contextmanager
    def _locked(self, qid: str) -> Iterator[int]:
        """flock the entry's env file; yield an fd on the current (locked) inode."""
        path = self.envelope_path(qid)
        for _ in range(_LOCK_ATTEMPTS):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise NotFound(f"no such queue entry: {qid}") from None
            except OSError as e:
                raise _spool_error(e, f"qid={qid} opening envelope") from None
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    current = os.stat(path)
                except FileNotFoundError:
                    raise NotFound(f"no such queue entry: {qid}") from None
                except OSError as e:
                    raise _spool_error(e, f"qid={qid} locking envelope") from None
                # Someone renamed a new version over the path while we waited: lock that one.
                if os.path.samestat(os.fstat(fd), current):
                    yield fd
                    return
            finally:
                os.close(fd)  # also releases the lock
        raise SpoolError(f"qid={qid}: could not lock the envelope")

    def update(self, qid: str, change: Callable[[Envelope], Envelope]) -> Envelope:
        """Apply `change` to the stored envelope under the entry's lock and store the result
        atomically (write to tmp/, fsync, rename, fsync env/). Returns the new envelope."""
        with self._locked(qid) as fd:
            try:
                raw = _read_all(fd)
            except OSError as e:
                raise _spool_error(e, f"qid={qid} reading envelope") from None
            new = change(self._parse(qid, raw))
            if new.id != qid:
                raise UsageError(f"qid={qid}: update changed the id to {new.id!r}")
            tmp = self.tmp_dir / f"{qid}.{secrets.token_hex(6)}.update"
            try:
                self._write_durably(tmp, new.to_json())
                os.rename(tmp, self.envelope_path(qid))
                _fsync_dir(self.env_dir)
            except OSError as e:
                _unlink_quietly(tmp)
                raise _spool_error(e, f"qid={qid} updating envelope") from None
        return new

    def remove(self, qid: str) -> None:
        """Delete an entry: env first (then it is no longer committed), then msg."""
        with self._locked(qid):
            try:
                self.envelope_path(qid).unlink()
                # Durable before the msg goes: a crash must never leave an env without a msg
                # (that would look like corruption) — a msg without env is simply cleaned up.
                _fsync_dir(self.env_dir)
                self.message_path(qid).unlink(missing_ok=True)
            except OSError as e:
                raise _spool_error(e, f"qid={qid} removing entry") from None
        log.debug("qid=%s removed", qid)

    def hold(self, qid: str) -> Envelope:
        """The engine skips held entries until `release()`."""
        envelope = self.update(qid, lambda e: replace(e, held=True))
        self.poke()
        return envelope

    def release(self, qid: str) -> Envelope:
        envelope = self.update(qid, lambda e: replace(e, held=False))
        self.poke()
        return envelope

    def delete(self, qid: str) -> None:
        """`remove()` plus a poke, for the operator (the engine forgets the entry)."""
        self.remove(qid)
        self.poke()

    def flush(self, qid: str | None = None) -> int:
        """Make pending recipients due now (one entry, or all when qid is None); poke the engine.

        Returns the number of entries changed. With qid None, entries that vanish meanwhile are
        skipped, and so are unreadable ones (logged).
        """
        now = utcnow()

        def due_now(envelope: Envelope) -> Envelope:
            recipients = tuple(
                replace(r, next_attempt_at=now) if r.state == "pending" else r
                for r in envelope.recipients
            )
            return replace(envelope, recipients=recipients)

        if qid is not None:
            self.update(qid, due_now)
            count = 1
        else:
            count = 0
            for each in self.ids():
                try:
                    self.update(each, due_now)
                except NotFound:
                    continue  # delivered and removed meanwhile
                except SpoolError as e:
                    log.warning("qid=%s flush skipped: %s", each, e)
                    continue
                count += 1
        self.poke()
        return count

    # -- waking a running engine --------------------------------------------------------------

    def wakeup_mtime(self) -> float:
        """The mtime of spool/wakeup (0.0 if absent). A change means "rescan the spool"."""
        try:
            return os.stat(self.wakeup_path).st_mtime
        except FileNotFoundError:
            return 0.0
        except OSError as e:
            raise _spool_error(e, "stat of spool wakeup file") from None

    def poke(self) -> None:
        """Touch spool/wakeup so that a running engine rescans."""
        try:
            fd = os.open(self.wakeup_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
            try:
                if self._owner is not None:
                    os.fchown(fd, *self._owner)
                # Timestamps are coarse (a clock tick) and the engine compares floats: step at
                # least 1 µs past the old value, so two pokes in one tick still differ.
                old = os.fstat(fd).st_mtime_ns
                new = max(time.time_ns(), old + 1000)
                os.utime(fd, ns=(new, new))
            finally:
                os.close(fd)
        except OSError as e:
            raise _spool_error(e, "touching spool wakeup file") from None

    # -- file helpers -------------------------------------------------------------------

    def _write_new(
        self,
        path: Path,
        head: bytes,
        body: bytes | bytearray = b"",
        *,
        source: Path | None = None,
    ) -> int:
        """Create `path` (0600, must not exist) with head + body (+ the bytes of `source`) and
        return its open fd, not yet fsynced. On error the file is removed and the OSError
        propagates."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
        try:
            if self._owner is not None:
                os.fchown(fd, *self._owner)
            _write_all(fd, head)
            if body:
                _write_all(fd, body)
            if source is not None:
                src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    while chunk := os.read(src, _CHUNK):
                        _write_all(fd, chunk)
                finally:
                    os.close(src)
        except BaseException:
            os.close(fd)
            _unlink_quietly(path)
            raise
        return fd

    def _write_durably(self, path: Path, data: bytes) -> None:
        """Create `path` with `data`, fsync and close it (removed again on error)."""
        fd = self._write_new(path, data)
        try:
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(path)
            raise
        os.close(fd)

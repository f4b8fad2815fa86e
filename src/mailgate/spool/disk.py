"""File-system primitives of the spool: the only place that knows how to write, copy and
sync bytes, and which OS errors mean "no room".

Owns: mapping OSError to SpoolFull/SpoolError, whole writes, in-kernel copies, directory
fsyncs, quiet cleanup, creating the spool folders, emptying spool/tmp/ and picking a free name
in spool/corrupt/. Must not: know the journal's record format or any entry's meaning.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from mailgate.errors import SpoolError, SpoolFull

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024  # read/copy block: bounded memory for 50 MB messages
FILE_MODE = 0o600
DIR_MODE = 0o700
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# copy_file_range cannot do it here (old kernel, other file system): copy through memory.
_COPY_FALLBACK = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP})
_NAME_ATTEMPTS = 1000  # corrupt/<name>.<n>: names an operator has not looked at yet


def spool_error(e: OSError, what: str) -> SpoolError:
    """ENOSPC/EDQUOT/EFBIG mean "no room" (452 4.3.1); everything else is an internal error."""
    text = f"{what}: {e.strerror or e}"
    if e.errno in _FULL_ERRNOS:
        return SpoolFull(text)
    return SpoolError(text)


def write_counted(fd: int, data: bytes | bytearray | memoryview) -> tuple[int, OSError | None]:
    """Write all of `data`; return how much was written and the error that stopped it."""
    view = memoryview(data)
    written = 0
    while written < len(view):  # bounded: every write makes progress or ends the loop
        try:
            n = os.write(fd, view[written:])
        except OSError as e:
            return written, e
        if n <= 0:
            return written, OSError(errno.EIO, "write made no progress")
        written += n
    return written, None


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of `data` or raise the OSError that stopped it."""
    _, error = write_counted(fd, data)
    if error is not None:
        raise error


def copy_range(source: int, target: int, offset: int, length: int) -> None:
    """Append `length` bytes of `source` from `offset` at `target`'s position, in the kernel
    when it can (no trip through Python memory for a 50 MB message)."""
    done = 0
    in_kernel = True
    while done < length:  # bounded: every pass copies at least one byte or raises
        count = min(length - done, 16 * CHUNK)
        if in_kernel:
            try:
                n = os.copy_file_range(source, target, count, offset + done)
            except OSError as e:
                if e.errno not in _COPY_FALLBACK:
                    raise
                in_kernel = False
                continue
        else:
            block = os.pread(source, min(count, CHUNK), offset + done)
            if block:
                write_all(target, block)
            n = len(block)
        if n <= 0:
            raise OSError(errno.EIO, "source shorter than its recorded length")
        done += n


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """`length` bytes at `offset`, or OSError(EIO) when the file is shorter."""
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise OSError(errno.EIO, "file shorter than its index")
    return data


def is_prefix_of(path: Path, fd: int, size: int) -> bool:
    """Whether the file at `path` holds the first bytes of `fd` (which has `size` bytes)."""
    with open(path, "rb") as f:
        offset = 0
        while block := f.read(CHUNK):  # bounded by the file's size
            if offset + len(block) > size or os.pread(fd, len(block), offset) != block:
                return False
            offset += len(block)
    return offset > 0


def fsync_dir(path: Path) -> None:
    """Make renames, creations and unlinks in `path` durable (the name, not just the data)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def close_quietly(fd: int | None) -> None:
    """Close a read descriptor (closing one cannot lose data, so a failure is only logged)."""
    if fd is not None:
        try:
            os.close(fd)
        except OSError as e:
            log.debug("spool: close failed: %s", e)


def unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as e:  # cleanup must never hide the error that made us clean up
        log.warning("spool cleanup failed path=%s error=%s", path, e.strerror)


def write_new_file(path: Path, data: bytes, owner: tuple[int, int] | None) -> None:
    """Create `path` (0600, must not exist) with `data`, fsynced, owned by `owner`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def free_name(directory: Path, name: str) -> Path:
    """`directory/name`, or `name.1`, `name.2`... : never overwrite what an operator has not
    looked at yet."""
    target = directory / name
    for n in range(1, _NAME_ATTEMPTS):  # bounded: names are finite
        if not target.exists():
            break
        target = directory / f"{name}.{n}"
    return target


def empty_tmp(tmp_dir: Path) -> int:
    """Recovery: remove what was being received when the server stopped; how many files."""
    removed = 0
    for p in sorted(tmp_dir.iterdir()):
        if p.is_dir() and not p.is_symlink():
            log.warning("spool recovery: leaving unexpected directory %s", p)
            continue
        p.unlink()
        removed += 1
    return removed


def make_spool_dirs(path: Path, dirs: Sequence[Path]) -> tuple[int, int] | None:
    """Create the spool folders (0700) and return the owner new files must get.

    `mailgate queue` run as root must not leave root-owned 0600 files that a server running as
    an unprivileged user could no longer read: new files then take the spool's owner.
    """
    created = []
    try:
        for d in (path, *dirs):
            if not d.is_dir():
                d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
                os.chmod(d, DIR_MODE)  # mkdir's mode is filtered by the umask
                created.append(d)
        st = os.stat(path)
        if os.geteuid() != 0 or st.st_uid == 0:
            return None
        for d in created:  # folders, like files, belong to the spool's owner
            os.chown(d, st.st_uid, st.st_gid)
    except OSError as e:
        raise spool_error(e, f"spool {path}") from None
    return (st.st_uid, st.st_gid)

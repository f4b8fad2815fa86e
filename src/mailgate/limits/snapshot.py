"""The rate-limit snapshot file, <spool>/limits.json: written by `serve`, read by the CLI.

Owns: its location, the atomic write and the read. Must not: build the contents (that is
`Limits.snapshot()` and `AuthGuard.snapshot()`). The write is atomic (a temporary file in the
same directory, fsync, rename) so `mailgate limits report` never reads half a file. The file
is 0600: it names logins and client addresses.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

SNAPSHOT_NAME = "limits.json"


def snapshot_path(spool_path: Path) -> Path:
    """Where `serve` writes the snapshot: next to the spool's tmp/ and journal/ folders."""
    return Path(spool_path) / SNAPSHOT_NAME


def write_snapshot(path: Path, data: dict[str, Any]) -> None:
    """Replace `path` atomically with `data` as JSON. Raises OSError."""
    path = Path(path)
    # Key order is kept: limits and services are listed in their configuration order.
    encoded = (json.dumps(data, indent=1) + "\n").encode()
    # mkstemp creates the file 0600 in the target folder, so the rename cannot cross devices.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encoded)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_snapshot(path: Path) -> dict[str, Any]:
    """The snapshot at `path`. Raises FileNotFoundError, OSError or ValueError (not a
    snapshot)."""
    data = json.loads(Path(path).read_bytes())
    if not isinstance(data, dict) or data.get("version") != 1:
        raise ValueError(f"{path}: not a mailgate rate-limit snapshot")
    return data

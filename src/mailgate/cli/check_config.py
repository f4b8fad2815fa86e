"""`mailgate check-config`: validate the configuration and the files it names.

Owns: the checks beyond config.load(check_files=True): the certificate and key load and match
(tlscert.check_pair), the directory database opens (read-only: checking changes nothing) and
has a schema this mailgate understands, and the spool folder is writable. Prints `ok: <path>`
on success; otherwise the first problem, as one line naming the key
(`mailgate: tls.cert: ...`), and exits 1. Must not: create or modify anything (beyond a
probe file in the spool folder, removed at once, and SQLite's own -wal/-shm files).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from mailgate import tlscert
from mailgate.cli.common import load_config, open_directory
from mailgate.config import Config
from mailgate.directory.store import SCHEMA_VERSION
from mailgate.errors import ConfigError, DirectoryError


def register(sub: Any) -> None:
    p = sub.add_parser("check-config", help="validate the configuration; name the bad key")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args, check_files=True)
    check(cfg)
    print(f"ok: {cfg.path}")
    return 0


def check(cfg: Config) -> None:
    """Raise ConfigError naming the key of the first problem found."""
    if cfg.submission.listen or cfg.submissions.listen or (cfg.web.listen and cfg.web.tls):
        tlscert.check_pair(cfg.tls.cert, cfg.tls.key)
    if cfg.directory.is_sqlite:
        _check_directory(cfg.directory.sqlite_path)
    else:
        _check_shared_directory(cfg)
    _check_writable_folder("spool.path", cfg.spool.path)


def _check_directory(path: Path) -> None:
    key = "directory.url"
    if not path.exists():
        # The first `mailgate user add` (or `serve`) creates it; its folder must allow that.
        _check_writable_folder(key, path.parent, what="folder of the database")
        return
    if not path.is_file():
        raise ConfigError(f"{key}: {path} is not a file")
    try:
        # mode=ro: never create or change the database while checking it.
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT max(version) FROM schema_version").fetchone()
        finally:
            db.close()
    except sqlite3.Error as e:
        raise ConfigError(f"{key}: cannot open the database {path}: {e}") from None
    if row[0] is not None and row[0] > SCHEMA_VERSION:  # older: opening migrates it
        raise ConfigError(
            f"{key}: {path} has schema version {row[0]}, this mailgate understands {SCHEMA_VERSION}"
        )


def _check_shared_directory(cfg: Config) -> None:
    """PostgreSQL: reachable, and its schema is the one this mailgate uses."""
    try:
        open_directory(cfg).close()
    except DirectoryError as e:
        raise ConfigError(f"directory.url: {e}") from None


def _check_writable_folder(key: str, path: Path, *, what: str = "folder") -> None:
    if not path.exists():
        # serve creates the spool's subfolders, not the spool itself: `mailgate init` does.
        raise ConfigError(f"{key}: {what} {path} does not exist")
    if not path.is_dir():
        raise ConfigError(f"{key}: {path} is not a folder")
    # Really try: os.access() answers for the real uid and ignores ACLs and read-only mounts.
    try:
        fd, name = tempfile.mkstemp(prefix=".check-config-", dir=path)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise ConfigError(f"{key}: {what} {path} is not writable: {e.strerror}") from None

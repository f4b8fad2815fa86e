"""Numbered schema migrations for both directory backends.

Owns: finding the migration scripts (package data under directory/migrations/<dialect>/,
named NNNN_what.sql) and the rule that a database at version N gets every script numbered
above N, in order, each recorded in schema_version. The runner itself is
`SqlDirectory.migrate()` (directory/sql.py), which holds the backend's write lock while it
runs, so two nodes migrating at once apply each step once.

Adding a step: write the next number for *both* dialects (sqlite/ and postgresql/), with the
same effect; nothing else changes. Must not: edit a script that has shipped (a database that
ran it would never see the change): add a new one instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

DIALECTS = ("sqlite", "postgresql")
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str  # the file name, for the log
    sql: str


@cache
def migrations(dialect: str) -> tuple[Migration, ...]:
    """Every migration of `dialect`, by version; the numbers must run 1, 2, 3 ... with no gap."""
    folder = resources.files("mailgate.directory").joinpath("migrations", dialect)
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"directory migrations for {dialect} are not numbered 1..N")
    return tuple(found)


def latest(dialect: str) -> int:
    """The schema version this mailgate creates and understands."""
    return len(migrations(dialect))


def pending(dialect: str, current: int) -> list[Migration]:
    return [m for m in migrations(dialect) if m.version > current]

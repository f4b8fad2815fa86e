"""`mailgate directory`: migrate (create or upgrade the schema), copy (to another database).

Owns: the command-line side of the directory's schema and of moving a one-node directory onto
PostgreSQL. Must not: touch tables itself (directory/sql.py does), or print a URL's password.
"""

from __future__ import annotations

import argparse
from typing import Any

from mailgate.cli.common import load_config, open_directory
from mailgate.directory import migrate, open_url
from mailgate.directory.postgres import redact


def register(sub: Any) -> None:
    p = sub.add_parser("directory", help="the directory's database: schema and copying")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    mig = verbs.add_parser("migrate", help="create or upgrade the schema (safe to repeat)")
    mig.set_defaults(func=_migrate)
    copy = verbs.add_parser(
        "copy", help="copy users, domains, DKIM key rows and grants into another (empty) database"
    )
    copy.add_argument("--to", required=True, metavar="URL",
                      help="postgresql://USER@HOST:PORT/DB (or sqlite:///PATH)")  # fmt: skip
    copy.set_defaults(func=_copy)


def _migrate(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    with open_directory(cfg, check=False) as directory:
        applied = directory.migrate()
        version = directory.schema_version()
    label = directory.label
    if applied:
        print(f"migrated {label} to schema version {version} ({', '.join(applied)})")
    else:
        print(f"{label} is at schema version {version} (latest: "
              f"{migrate.latest(directory.dialect)}): nothing to do")  # fmt: skip
    return 0


def _copy(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    with (
        open_directory(cfg) as source,
        open_url(
            args.to, default_domain=cfg.directory.default_domain, data_dir=cfg.base_dir, check=False
        ) as target,
    ):
        counts = source.copy_to(target)
    summary = ", ".join(f"{n} {table}" for table, n in counts.items())
    print(f"copied {source.label} to {redact(args.to)}: {summary}")
    return 0

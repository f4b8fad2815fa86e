"""The `mailgate` command: argparse, one module per noun. The only place that wires objects.

Each command module exposes `register(subparsers)`, which adds its parser(s) and sets
`func=handler`, where `handler(args) -> int` returns the exit status. Errors that a user can
fix are raised as `CommandError` (or ConfigError / DirectoryError) and printed as one line:
`mailgate: <problem>` on stderr, exit 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mailgate.cli import (
    address,
    app_password,
    check_config,
    directory,
    domain,
    init,
    limits,
    queue,
    reload,
    serve,
    sink,
    status,
    trace,
    user,
)
from mailgate.cli.common import CommandError
from mailgate.errors import MailgateError

_MODULES = (
    init, serve, check_config, user, domain, address, app_password, directory, queue, limits,
    sink, trace, status, reload,
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailgate", description="Outgoing mail service.")
    parser.add_argument("-c", "--config", help="configuration file (default: $MAILGATE_CONFIG "
                        "or ./mailgate.toml)")  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except (CommandError, MailgateError) as e:
        print(f"mailgate: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mailgate queue list | head`
        sys.stderr.close()
        return 141
    return status

"""`mailgate app-password`: passwords for programs that cannot do the institution's single
sign-on (INTERFACE.md part 2, "The institution's existing accounts").

Owns: the command-line side: `add LOGIN NAME` (prints a new random password once, on stdout,
and stores only its hash), `list [LOGIN] [--json]` (login, name, created, last used; never the
password) and `remove LOGIN NAME` (effective at once: the server's credential cache follows the
directory's generation). They work with every [auth] backend; for an LDAP or Dovecot login the
first app password gives the login a users row without a password.
Must not: print or log a password anywhere but `add`'s standard output, or touch the database
other than through the directory object.
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from mailgate.cli.common import (
    CommandError,
    ensure_account,
    load_config,
    open_directory,
    print_json,
)
from mailgate.directory import AppPassword, passwords

MAX_NAME_LENGTH = 64


def register(sub: Any) -> None:
    p = sub.add_parser("app-password", help="passwords for programs (any [auth] backend)")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    add = verbs.add_parser("add", help="make a new app password for LOGIN; printed once")
    add.add_argument("login")
    add.add_argument("name", help='what it is for, e.g. "thunderbird-laptop"')
    add.set_defaults(func=_add)

    ls = verbs.add_parser("list", help="list app passwords (never the passwords themselves)")
    ls.add_argument("login", nargs="?", help="only this login's")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_list)

    remove = verbs.add_parser("remove", help="revoke an app password at once")
    remove.add_argument("login")
    remove.add_argument("name")
    remove.set_defaults(func=_remove)


def _add(args: argparse.Namespace) -> int:
    name = _check_name(args.name)
    cfg = load_config(args)
    password = passwords.new_app_password()
    with open_directory(cfg) as directory:
        ensure_account(cfg, directory, args.login)  # an LDAP or Dovecot login
        directory.add_app_password(args.login, name, passwords.app_password_hash(password))
    # The only time the password exists outside the user's hands: stdout, nothing else.
    print(password)
    return 0


def _list(args: argparse.Namespace) -> int:
    with open_directory(load_config(args)) as directory:
        if args.login is not None and directory.get_user(args.login) is None:
            raise CommandError(f"unknown login {args.login!r}")
        apps: list[AppPassword] = directory.list_app_passwords(args.login)
    if args.json:
        print_json([{"login": a.login, "name": a.name, "created": _iso(a.created_at),
                     "last_used": _iso(a.last_used_at)} for a in apps])  # fmt: skip
        return 0
    if not apps:
        print("no app passwords")
        return 0
    rows = [(a.login, a.name, _iso(a.created_at) or "", _iso(a.last_used_at) or "never")
            for a in apps]  # fmt: skip
    heads = ("LOGIN", "NAME", "CREATED", "LAST USED")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    for row in (heads, *rows):
        print("  ".join(f"{v:<{w}}" for v, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _remove(args: argparse.Namespace) -> int:
    with open_directory(load_config(args)) as directory:
        directory.remove_app_password(args.login, args.name)
    print(f"removed app password {args.name!r} of {args.login}")
    return 0


def _check_name(name: str) -> str:
    if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable() or name != name.strip():
        raise CommandError(f"invalid app password name {name!r}: expected 1-{MAX_NAME_LENGTH} "
                           "printable characters")  # fmt: skip
    return name


def _iso(when: dt.datetime | None) -> str | None:
    return None if when is None else when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

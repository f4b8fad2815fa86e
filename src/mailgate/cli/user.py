"""`mailgate user`: add, passwd, disable, enable, remove, list (INTERFACE.md "Command line").

Owns: the command-line side of accounts: argument parsing, the default primary address
(LOGIN@directory.default_domain) and the output. Must not: touch the database other than
through the directory object, or print passwords or hashes.
"""

from __future__ import annotations

import argparse
from typing import Any

from mailgate.cli.common import (
    load_config,
    open_directory,
    primary_address,
    print_json,
    read_password,
)
from mailgate.directory import User


def register(sub: Any) -> None:
    p = sub.add_parser("user", help="manage accounts (logins) that may submit mail")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    add = verbs.add_parser("add", help="add an account")
    add.add_argument("login")
    add.add_argument("--address", help="primary address (default: LOGIN@default_domain)")
    _password_stdin(add)
    add.set_defaults(func=_add)

    passwd = verbs.add_parser("passwd", help="set an account's password")
    passwd.add_argument("login")
    _password_stdin(passwd)
    passwd.set_defaults(func=_passwd)

    for verb, func, text in (
        ("disable", _disable, "refuse the account's logins"),
        ("enable", _enable, "allow the account's logins again (also lifts a suspension)"),
        ("remove", _remove, "remove the account and its granted addresses"),
    ):
        q = verbs.add_parser(verb, help=text)
        q.add_argument("login")
        q.set_defaults(func=func)

    ls = verbs.add_parser("list", help="list accounts")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_list)


def _password_stdin(p: argparse.ArgumentParser) -> None:
    # Never a password on the command line: it would show in ps and the shell history.
    p.add_argument("--password-stdin", action="store_true", required=True,
                   help="read the password (one line) from standard input")  # fmt: skip


def _add(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    password = read_password(args)
    address = args.address or primary_address(args.login, cfg.directory.default_domain)
    with open_directory(cfg) as directory:
        user: User = directory.add_user(args.login, address, password)
    print(f"added user {user.login} <{user.address}>")
    return 0


def _passwd(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    password = read_password(args)
    with open_directory(cfg) as directory:
        directory.set_password(args.login, password)
    print(f"password changed for {args.login}")
    return 0


def _disable(args: argparse.Namespace) -> int:
    with open_directory(load_config(args)) as directory:
        directory.set_enabled(args.login, False)
    print(f"disabled {args.login}")
    return 0


def _enable(args: argparse.Namespace) -> int:
    with open_directory(load_config(args)) as directory:
        directory.set_enabled(args.login, True)
        # An operator who enables an account has looked at it: lift the breaker's suspension.
        directory.set_suspended(args.login, False)
    print(f"enabled {args.login}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    with open_directory(load_config(args)) as directory:
        directory.remove_user(args.login)
    print(f"removed {args.login}")
    return 0


def _list(args: argparse.Namespace) -> int:
    with open_directory(load_config(args)) as directory:
        users: list[User] = directory.list_users()
    if args.json:
        print_json([_as_json(u) for u in users])
        return 0
    if not users:
        print("no users")
        return 0
    width = max(len("LOGIN"), *(len(u.login) for u in users))
    state_width = max(len("STATE"), *(len(_state(u)) for u in users))
    print(f"{'LOGIN':<{width}}  {'STATE':<{state_width}}  ADDRESS")
    for u in users:
        print(f"{u.login:<{width}}  {_state(u):<{state_width}}  {u.address}")
    return 0


def _as_json(user: User) -> dict[str, object]:
    return {
        "login": user.login,
        "address": user.address,
        "enabled": user.enabled,
        "suspended": user.suspended,
    }


def _state(user: User) -> str:
    states = ["enabled" if user.enabled else "disabled"]
    if user.suspended:
        states.append("suspended")
    return "+".join(states)

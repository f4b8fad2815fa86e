"""`mailgate address`: grant addresses to logins (INTERFACE.md "Command line").

Owns: the command-line side of grants: `address add ADDRESS --owner LOGIN` (ADDRESS may be
"*@domain", every address of the domain), `address remove ADDRESS [--owner LOGIN]` and
`address list [--owner LOGIN] [--json]`. A user may always send as their primary address;
that is not a grant and is not listed here (see `mailgate user list`). Must not: touch the
database other than through the directory object.
"""

from __future__ import annotations

import argparse
from typing import Any

from mailgate.cli.common import (
    CommandError,
    ensure_account,
    load_config,
    open_directory,
    print_json,
)


def register(sub: Any) -> None:
    p = sub.add_parser("address", help="grant sender addresses to logins")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    add = verbs.add_parser("add", help="let LOGIN send as ADDRESS (in a managed domain)")
    add.add_argument("address", help='an address, or "*@DOMAIN" for every address of DOMAIN')
    add.add_argument("--owner", required=True, metavar="LOGIN")
    add.set_defaults(func=_add)

    remove = verbs.add_parser("remove", help="withdraw a grant")
    remove.add_argument("address")
    remove.add_argument("--owner", metavar="LOGIN", help="only this login's grant (default: all)")
    remove.set_defaults(func=_remove)

    ls = verbs.add_parser("list", help="list grants")
    ls.add_argument("--owner", metavar="LOGIN", help="only this login's grants")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_list)


def _add(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    with open_directory(cfg) as directory:
        ensure_account(cfg, directory, args.owner)  # an LDAP or Dovecot login
        # The directory refuses an unknown login and a domain that is not managed.
        directory.grant(args.address, args.owner)
    print(f"granted {args.address} to {args.owner}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    with open_directory(load_config(args)) as directory:
        directory.revoke(args.address, args.owner)
    owner = f" from {args.owner}" if args.owner else ""
    print(f"removed {args.address}{owner}")
    return 0


def _list(args: argparse.Namespace) -> int:
    with open_directory(load_config(args)) as directory:
        if args.owner is not None and directory.get_user(args.owner) is None:
            raise CommandError(f"unknown login {args.owner!r}")
        grants: list[tuple[str, str]] = directory.list_grants(args.owner)
    if args.json:
        print_json([{"address": address, "owner": login} for address, login in grants])
        return 0
    if not grants:
        print("no granted addresses")
        return 0
    width = max(len("ADDRESS"), *(len(address) for address, _ in grants))
    print(f"{'ADDRESS':<{width}}  OWNER")
    for address, login in grants:
        print(f"{address:<{width}}  {login}")
    return 0

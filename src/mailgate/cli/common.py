"""Helpers shared by the command modules: loading config, opening the directory, printing."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mailgate import config
from mailgate.cli import privileges
from mailgate.config import Config
from mailgate.errors import ConfigError


class CommandError(Exception):
    """A one-line problem the user can fix; printed as `mailgate: <message>`."""


def config_path(args: argparse.Namespace) -> Path:
    return Path(args.config) if args.config else config.default_path()


def load_config(args: argparse.Namespace, *, check_files: bool = False,
                as_service_user: bool = True) -> Config:  # fmt: skip
    """The configuration; administrative commands need not the certificate, so files are not
    checked by default.

    Started as root with [server] user set, the command then runs as that account (`serve`
    switches later, itself), so that whatever it creates (spool records, DKIM keys, the
    database's journal files) belongs to the service and not to root.
    """
    path = config_path(args)
    cfg = config.load(path, check_files=False)
    account = privileges.service_account(cfg) if as_service_user else None
    if not privileges.become(account):
        return config.load(path) if check_files else cfg
    try:  # again as the service account: it must be able to read it
        return config.load(path, check_files=check_files)
    except ConfigError as e:
        raise ConfigError(f"{e} (as user {cfg.server.user})") from None


def open_directory(cfg: Config, *, check: bool = True) -> Any:
    """The directory backend named by directory.url (check: refuse an old PostgreSQL schema)."""
    from mailgate.directory import open_url

    return open_url(cfg.directory.url, default_domain=cfg.directory.default_domain,
                    data_dir=cfg.base_dir, check=check)  # fmt: skip


def primary_address(login: str, default_domain: str) -> str:
    """INTERFACE.md: LOGIN@default_domain; a login that is itself an address is its own."""
    return login if "@" in login else f"{login}@{default_domain}"


def ensure_account(cfg: Config, directory: Any, login: str) -> None:
    """With an external [auth] backend (LDAP, Dovecot), a login mailgate keeps something for
    (a grant, an app password) gets a users row without a password on first use."""
    if cfg.auth.backend != "directory":
        directory.ensure_account(login, primary_address(login, cfg.directory.default_domain))


def read_password(args: argparse.Namespace) -> str:
    """--password-stdin: one line; its line ending is not part of the password."""
    line = sys.stdin.readline()
    password = line.removesuffix("\n").removesuffix("\r")
    if not password:
        raise CommandError("empty password on standard input")
    return password


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")

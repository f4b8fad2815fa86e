"""`mailgate init [DIR]`: a new installation in DIR (INTERFACE.md "Command line").

Owns: the annotated mailgate.toml template (every INTERFACE.md key with a comment; the other
settings commented out with their defaults), and creating what it names: a self-signed TLS
certificate and key (tlscert.py), the SQLite directory and the spool folder. Must not: destroy
anything. Running init again keeps every file that exists (and says so) and creates only what
is missing, at the paths the existing mailgate.toml names.

`--user NAME` (as root) writes `[server] user` and gives that account what it creates: the
folder, the spool, the database, the keys and the DKIM key folder. `--system` is the layout of
a Debian service (docs/INSTALL.md lists owners and modes): /etc/mailgate/mailgate.toml
(root:mailgate 0640) and /etc/mailgate/dkim/, /var/lib/mailgate for the database and the TLS
key, /var/spool/mailgate, all owned by the service account. Whatever the umask, nothing init
creates is writable by group or others.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import ipaddress
import json
import os
import socket
from pathlib import Path
from typing import Any

from mailgate import config, tlscert
from mailgate.cli import privileges
from mailgate.cli.common import CommandError
from mailgate.config import Config, ServerConfig
from mailgate.directory.store import SqliteDirectory
from mailgate.errors import ConfigError
from mailgate.spool import open_store

DEFAULT_DOMAIN = "example.org"
DEFAULT_NETWORKS = ("127.0.0.0/8", "::1/128")
SERVICE_PORTS = (("submission", 587), ("submissions", 465), ("smarthost", 25))
WILDCARD_HOSTS = ("0.0.0.0", "[::]")
CLAMD_SOCKETS = (Path("/run/clamav/clamd.ctl"), Path("/var/run/clamav/clamd.ctl"))
# `init --system`: where a Debian operator looks for each part.
SYSTEM_CONFIG_DIR = Path("/etc/mailgate")
SYSTEM_STATE_DIR = Path("/var/lib/mailgate")
SYSTEM_SPOOL = Path("/var/spool/mailgate")
SYSTEM_USER = "mailgate"

# Keys that the template writes out with a comment; every other setting of a section is
# appended commented out, with its default, so the file shows all there is.
_EXPLAINED = {
    "directory": ("url", "default_domain"),
    "spool": ("path",),
    "tls": ("cert", "key"),
    "submission": ("listen",),
    "submissions": ("listen",),
    "smarthost": ("listen", "networks"),
    "delivery": ("nameservers", "smtp_port", "relay"),
    "scanner": ("clamd", "blocked_extensions"),
    "limits": ("max_message_size",),
    "server": ("user",),
    "trace": ("path",),
}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "init", help="create mailgate.toml, a self-signed TLS certificate, database and spool"
    )
    p.add_argument("dir", nargs="?", metavar="DIR",
                   help="folder to set up (default: the folder of -c, else .)")  # fmt: skip
    p.add_argument("--hostname", help="this gateway's name (default: the host's FQDN)")
    p.add_argument("--default-domain", metavar="DOMAIN",
                   help=f"domain of primary addresses (default: {DEFAULT_DOMAIN})")  # fmt: skip
    p.add_argument("--listen-host", metavar="HOST",
                   help="listen on this address only (default: 0.0.0.0 and [::])")  # fmt: skip
    p.add_argument("--port-base", metavar="N", type=int,
                   help="add N to the ports 25, 587, 465 (e.g. 10000 for tests)")  # fmt: skip
    p.add_argument("--user", metavar="NAME",
                   help="as root: the account `serve` runs as ([server] user); it gets the "
                        "spool, database and keys")  # fmt: skip
    p.add_argument("--system", action="store_true",
                   help=f"as root: {SYSTEM_CONFIG_DIR}/mailgate.toml, {SYSTEM_STATE_DIR}, "
                        f"{SYSTEM_SPOOL}, owned by --user (default {SYSTEM_USER})")  # fmt: skip
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # Whatever the caller's umask: nothing here may be writable by group or others, and the
    # configuration must stay readable (the modes given below are exact under 022).
    os.umask(0o022)
    if args.system:
        if args.dir is not None or args.config:
            raise CommandError(f"init --system: takes no DIR or -c; it writes {SYSTEM_CONFIG_DIR}")
        args.user = args.user or SYSTEM_USER
        path = SYSTEM_CONFIG_DIR / "mailgate.toml"
    elif args.dir is not None:
        path = Path(args.dir) / "mailgate.toml"
    elif args.config:
        path = Path(args.config)
    else:
        path = Path("mailgate.toml")
    path = path.absolute()
    account = _account(args)
    try:
        _mkdirs(path.parent, 0o755)
    except OSError as e:
        raise CommandError(f"cannot create {path.parent}: {e.strerror}") from None

    cfg = _config(path, args, account)
    if args.system:
        _mkdirs(SYSTEM_STATE_DIR, 0o700, owner=account)
    _spool(cfg, account)
    _directory(cfg, account)
    _tls(cfg, account)
    if account is not None:
        _give(account, path.parent / "dkim", 0o700)  # `domain add` writes keys there as it
        if not args.system:  # DIR holds the database: SQLite makes its journal files there
            _give(account, path.parent, 0o755)
    _next_steps(cfg, explicit=args.dir is not None or bool(args.config) or args.system,
                system=args.system)  # fmt: skip
    return 0


def _account(args: argparse.Namespace) -> privileges.Account | None:
    """The --user account (checked before anything is written), or None."""
    if not args.user:
        return None
    option = "--system" if args.system else "--user"
    if os.geteuid() != 0:
        raise CommandError(f"init {option}: run it as root (it gives files to {args.user})")
    cfg = Config(path=Path("mailgate.toml"), server=ServerConfig(user=args.user))
    try:
        return privileges.service_account(cfg)
    except ConfigError as e:
        raise CommandError(f"init {option}: {str(e).removeprefix('server.user: ')}") from None


def _mkdirs(path: Path, mode: int, *, owner: privileges.Account | None = None) -> None:
    """mkdir -p; the folders it creates get `mode` exactly (mkdir's mode is masked by the
    umask) and `owner`; folders that exist are left as they are."""
    missing = []
    for p in (path, *path.parents):
        if p.exists():
            break
        missing.append(p)
    for p in reversed(missing):
        p.mkdir(mode=mode)
        p.chmod(mode)
        if owner is not None:
            os.chown(p, owner.uid, owner.gid)


def _give(account: privileges.Account | None, path: Path, mode: int | None = None) -> None:
    """Make the service account the owner of `path` (a folder init created: `mode` too)."""
    if account is None:
        return
    if mode is not None:
        _mkdirs(path, mode)
    os.chown(path, account.uid, account.gid)


def _config(path: Path, args: argparse.Namespace, account: privileges.Account | None) -> Config:
    if path.exists():
        given = [f"--{k.replace('_', '-')}" for k in
                 ("hostname", "default_domain", "listen_host", "port_base")
                 if getattr(args, k) is not None]  # fmt: skip
        ignored = f"; ignored {', '.join(given)}" if given else ""
        print(f"kept {path} (already exists{ignored})")
        # Carry on with the paths it names: an operator may have moved the spool or the key.
        return config.load(path, check_files=False)
    text = render(
        hostname=args.hostname if args.hostname is not None else default_hostname(),
        default_domain=args.default_domain or DEFAULT_DOMAIN,
        listen=listeners(args.listen_host, args.port_base),
        user=args.user or "",
        state_dir=str(SYSTEM_STATE_DIR) if args.system else "",
        spool=str(SYSTEM_SPOOL) if args.system else "spool",
    )
    cfg = config.parse(text, path)  # a bad --hostname fails here, before anything is written
    if args.system and account is not None:  # readable by the service, writable by root
        _write_new(path, text.encode("utf-8"), 0o640)
        os.chown(path, 0, account.gid)
    else:
        _write_new(path, text.encode("utf-8"), 0o644)
    print(f"created {path}")
    return cfg


def _spool(cfg: Config, account: privileges.Account | None) -> None:
    spool = cfg.spool.path
    if spool.exists():
        print(f"kept {spool}/ (already exists)")
        return
    _mkdirs(spool, 0o700, owner=account)
    # Its layout too: `mailgate queue` refuses a folder that holds no spool (a mistyped path),
    # and must find an empty queue here before the first `serve`.
    open_store(cfg.spool)
    print(f"created {spool}/")


def _directory(cfg: Config, account: privileges.Account | None) -> None:
    if not cfg.directory.is_sqlite:
        # A shared database is the operator's: `mailgate directory migrate` prepares it.
        print("directory: run `mailgate directory migrate` to create its schema")
        return
    db_path = cfg.directory.sqlite_path
    existed = db_path.exists()
    _mkdirs(db_path.parent, 0o700, owner=account)
    # Opening it runs the migrations (creates the schema, or upgrades an older one).
    SqliteDirectory(
        db_path, default_domain=cfg.directory.default_domain, data_dir=cfg.base_dir
    ).close()
    if not existed:
        for p in (db_path, *(db_path.with_name(db_path.name + s) for s in ("-wal", "-shm"))):
            if p.exists():
                _give(account, p)
    print(f"{'kept' if existed else 'created'} {db_path}{' (already exists)' if existed else ''}")


def _tls(cfg: Config, account: privileges.Account | None) -> None:
    cert, key = cfg.tls.cert, cfg.tls.key
    if cert.exists() and key.exists():
        print(f"kept {cert} and {key} (already exist)")
        return
    if cert.exists() or key.exists():
        present, missing = (cert, key) if cert.exists() else (key, cert)
        # A new pair would replace the file that is there: leave that to the operator.
        raise CommandError(
            f"{missing} is missing but {present} exists; supply the missing file, or remove "
            f"{present} and run init again"
        )
    _mkdirs(key.parent, 0o700, owner=account)
    _mkdirs(cert.parent, 0o755, owner=account)
    tlscert.write_self_signed(cert, key, cfg.hostname)
    _give(account, key)  # read again by every worker, as the service account
    _give(account, cert)
    years = tlscert.VALIDITY.days // 365
    print(f"created {cert} and {key} (self-signed for {cfg.hostname}, valid {years} years)")


def _next_steps(cfg: Config, *, explicit: bool, system: bool = False) -> None:
    c = f"mailgate -c {cfg.path}" if explicit else "mailgate"
    start = (
        "systemctl enable --now mailgate   (install packaging/mailgate.service first: "
        "docs/INSTALL.md)"
        if system
        else f"{c} serve"
    )
    clamd = next((p for p in CLAMD_SOCKETS if p.exists()), None)
    scanner = (
        f'set scanner.clamd = "unix:{clamd}" to scan for viruses'
        if clamd
        else 'set scanner.clamd ("tcp:HOST:PORT" or "unix:/path") to scan for viruses'
    )
    print(
        f"""
next steps:
  1. review {cfg.path}: hostname, default_domain, smarthost.networks;
     {scanner}
  2. replace the self-signed certificate {cfg.tls.cert} with one from a CA
  3. add an account:   echo 'PASSWORD' | {c} user add alice --password-stdin
  4. add a domain:     {c} domain add {cfg.directory.default_domain}   (prints its DKIM record)
  5. check and start:  {c} check-config && {start}"""
    )


# --- the template ------------------------------------------------------------------


def default_hostname() -> str:
    """The host's FQDN, or "localhost" if it has none (no dot) or it is not a valid name."""
    name = socket.getfqdn().lower()
    if "." not in name:
        return "localhost"
    try:
        config.parse(f"hostname = {json.dumps(name)}", Path("mailgate.toml"))
    except ConfigError:
        return "localhost"
    return name


def listeners(host: str | None, port_base: int | None) -> dict[str, list[str]]:
    """Listen addresses per service: INTERFACE.md's defaults, or HOST:N+port for each service."""
    base = 0 if port_base is None else port_base
    top = base + max(port for _, port in SERVICE_PORTS)
    if base < 0 or top > 65535:
        raise CommandError(f"--port-base: {base} puts a port outside 1-65535")
    if host is None:
        hosts: tuple[str, ...] = WILDCARD_HOSTS
    else:
        bare = host.removeprefix("[").removesuffix("]")
        try:
            ip = ipaddress.ip_address(bare)
        except ValueError:
            if bare != "localhost":
                raise CommandError(f"--listen-host: {host!r} is not an IP address") from None
            hosts = (bare,)
        else:
            hosts = (f"[{ip}]" if ip.version == 6 else str(ip),)
    return {service: [f"{h}:{base + port}" for h in hosts] for service, port in SERVICE_PORTS}


def render(*, hostname: str, default_domain: str, listen: dict[str, list[str]], user: str = "",
           state_dir: str = "", spool: str = "spool") -> str:  # fmt: skip
    """The text of a new mailgate.toml: database and keys in `state_dir` (absolute; "" means
    next to the file), the spool at `spool`, and `[server] user` when `user` is given."""
    state = f"{state_dir}/" if state_dir else ""
    today = dt.datetime.now(dt.UTC).date().isoformat()
    defaults = Config(path=Path("mailgate.toml"))
    q = json.dumps  # a JSON string or list of strings is also a TOML one
    explained = {
        "directory": f"""\
# Accounts, managed domains and granted addresses (SQLite).
url = "sqlite:///{state}state.db"
# A user's primary address is LOGIN@default_domain unless `user add --address` gives one.
default_domain = {q(default_domain)}
""",
        "spool": f"""\
# Accepted messages wait here until delivered. Keep it on a local disk, mode 0700.
path = {q(spool)}
""",
        "tls": f"""\
# Certificate (PEM, the chain after it) and unencrypted key for ports 587 and 465.
# init made a self-signed pair; replace it with one from a CA, keeping the key 0600 and
# readable by the account `serve` runs as (every worker reads it, and reads it again when
# the files change).
cert = "{state}tls/cert.pem"
key = "{state}tls/key.pem"
""",
        "submission": f"""\
# Submission with STARTTLS, then AUTH (RFC 6409, RFC 3207, RFC 4954). Standard port 587.
listen = {q(listen["submission"])}
""",
        "submissions": f"""\
# Submission over implicit TLS, then AUTH (RFC 8314). Standard port 465.
listen = {q(listen["submissions"])}
""",
        "smarthost": f"""\
# Relay without AUTH for the hosts on `networks` only; everybody else is refused. Port 25.
listen = {q(listen["smarthost"])}
# Client networks allowed to relay, e.g. ["10.0.0.0/8", "2001:db8::/32"].
networks = {q(list(DEFAULT_NETWORKS))}
""",
        "delivery": f"""\
# DNS servers for MX lookups: [] is the system resolver; entries "IP" or "IP:PORT".
nameservers = []
# The port of the recipients' MX hosts.
smtp_port = {defaults.delivery.smtp_port}
# "HOST:PORT" sends all mail through this next hop instead of to MX hosts; "" delivers directly.
relay = ""
""",
        "scanner": f"""\
# clamd for virus scanning: "tcp:HOST:PORT" or "unix:/path"; "" scans no viruses.
# When set, mail is refused with 451 4.7.1 whenever clamd cannot be reached.
clamd = ""
# Attachments with these extensions are refused (a zip of them is accepted and scanned).
blocked_extensions = {q(list(defaults.scanner.blocked_extensions))}
""",
        "limits": f"""\
# The largest message accepted, in bytes (RFC 1870 SIZE).
max_message_size = {defaults.limits.max_message_size}
""",
    }
    if state_dir:  # the trace log is written by the service: beside its database
        explained["trace"] = f"""\
# The message event log behind `mailgate trace` and `mailgate status` (one file a day).
path = "{state}trace"
"""
    if user:
        explained["server"] = f"""\
# Started as root, `mailgate serve` checks its ports and reads its keys, then runs as this
# account before it reads a byte from the network; the other commands run as it too.
# It owns the spool, the database and the keys.
user = {q(user)}
"""
    out = [
        f"# mailgate configuration, written by `mailgate init` on {today}.",
        "# Relative paths are relative to the folder of this file.",
        "# After a change, `mailgate check-config` names any bad key.",
        "# Settings shown commented out have the value shown by default.",
        "",
        "# The name of this gateway: greeting, Received: and Message-ID headers, TLS certificate.",
        "# Give it A/AAAA records and a matching PTR, and use it in the domains' SPF records.",
        f"hostname = {q(hostname)}",
    ]
    for f in dataclasses.fields(defaults):
        section = getattr(defaults, f.name)
        if not dataclasses.is_dataclass(section):
            continue
        others = [
            f"# {g.name} = {value}"
            for g in dataclasses.fields(section)
            if g.name not in (_EXPLAINED.get(f.name, ()) if f.name in explained else ())
            and (value := _toml_value(getattr(section, g.name))) is not None
        ]
        if f.name in explained:
            out += ["", f"[{f.name}]", explained[f.name].rstrip("\n"), *others]
        elif others:
            # A section without anything to explain: uncommenting its lines enables it.
            out += ["", f"# [{f.name}]", *others]
    return "\n".join(out) + "\n"


def _toml_value(value: object) -> str | None:
    """`value` as TOML, or None for what has no TOML form here (nested tables, None)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, tuple | list):
        items = [_toml_value(v if isinstance(v, int | float | str) else str(v)) for v in value]
        return "[" + ", ".join(i for i in items if i is not None) + "]"
    return None


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `data`; never replace a file (O_EXCL)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)

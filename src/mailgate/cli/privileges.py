"""Running as the service account: `[server] user` and `group`.

Owns: looking the account up, switching a process started as root to it (supplementary groups,
gid, uid, in that order, and never back), keeping CAP_NET_BIND_SERVICE across the switch when a
listener needs a port below 1024, and dropping that last capability once a worker's sockets are
bound. Must not: bind sockets, read keys or open the spool itself; `serve` decides when.

Why the supervisor keeps CAP_NET_BIND_SERVICE: it forks the listener workers (again when one
dies), and each worker binds its own SO_REUSEPORT sockets, which the kernel lets join a port's
group only under the same uid. A worker drops the capability as soon as its sockets are bound,
before it accepts a connection, so everything that parses SMTP, MIME, DKIM and TLS from clients
runs as the service account without any capability. The supervisor's delivery engine runs as
the service account too, holding only that capability. Started as a non-root user with
CAP_NET_BIND_SERVICE (systemd's AmbientCapabilities=), nothing is switched and the workers still
drop the capability.

Capabilities are per thread in Linux; both switches happen while the process has one thread
(checked), before the event loop or any helper thread starts. Linux only, like `serve`.
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import importlib
import logging
import os
import pkgutil
import pwd
from dataclasses import dataclass
from pathlib import Path

from mailgate.config import Config
from mailgate.errors import ConfigError

log = logging.getLogger("mailgate.privileges")

_PR_SET_KEEPCAPS = 8  # linux/prctl.h
_LINUX_CAPABILITY_VERSION_3 = 0x20080522  # linux/capability.h
_CAP_NET_BIND_SERVICE = 10
_UNPRIVILEGED_PORT_START = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")


@dataclass(frozen=True, slots=True)
class Account:
    """The account named by [server] user/group, as this machine knows it."""

    user: str
    uid: int
    group: str
    gid: int


def service_account(cfg: Config) -> Account | None:
    """The [server] account, or None when `user` is empty. Unknown names raise ConfigError."""
    name = cfg.server.user
    if not name:
        if cfg.server.group:
            raise ConfigError("server.group: set only together with server.user")
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(
            f"server.user: no user {name!r} on this machine (create it: adduser --system "
            f"--group --home /var/lib/mailgate --no-create-home {name})"
        ) from None
    group = cfg.server.group
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"server.group: no group {group!r} on this machine") from None
    else:
        gid = entry.pw_gid
        with contextlib.suppress(KeyError):
            group = grp.getgrgid(gid).gr_name
    return Account(user=name, uid=entry.pw_uid, group=group or str(gid), gid=gid)


def become(account: Account | None, *, keep_bind: bool = False) -> bool:
    """Switch this process to `account` if it runs as root; True if it switched.

    Already running as the account (systemd's User=): nothing to do. Running as another user:
    a ConfigError, since only root can switch. keep_bind keeps CAP_NET_BIND_SERVICE.
    """
    if account is None or (os.geteuid() == account.uid and os.getegid() == account.gid):
        return False
    if os.geteuid() != 0:
        raise ConfigError(
            f"server.user: running as uid {os.geteuid()}, which cannot switch to "
            f"{account.user}; start mailgate as root or as {account.user}"
        )
    _require_one_thread()
    libc = ctypes.CDLL(None, use_errno=True)
    if keep_bind:
        _check(libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    os.initgroups(account.user, account.gid)  # e.g. ssl-cert, for keys under /etc/ssl/private
    os.setresgid(account.gid, account.gid, account.gid)
    os.setresuid(account.uid, account.uid, account.uid)
    if keep_bind:
        _set_capabilities(libc, 1 << _CAP_NET_BIND_SERVICE)
        _check(libc.prctl(_PR_SET_KEEPCAPS, 0, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    # Paranoia, as OpenSSH does: a switch that could be undone was no switch.
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover - the kernel refused to drop root
        raise RuntimeError("privilege switch failed: setuid(0) still succeeds")
    log.info("running as user=%s uid=%d group=%s gid=%d keep_bind=%s", account.user,
             account.uid, account.group, account.gid, "yes" if keep_bind else "no")  # fmt: skip
    return True


# Packages whose every module is imported before the switch, and single modules that the
# standard library or a dependency imports only on first use.
_PRELOAD_PACKAGES = ("mailgate", "dns.rdtypes")
_PRELOAD_MODULES = ("encodings.idna", "dkim", "uvloop")


def load_code() -> None:
    """Import, before the switch, every module the server may import later.

    The service account need not be able to read the Python installation mailgate runs from (a
    virtual environment under /root, say): a module first imported after the switch would fail
    there, in the middle of a session. Optional dependencies that are not installed are skipped.
    """
    for name in _PRELOAD_PACKAGES:
        with contextlib.suppress(ImportError):
            package = importlib.import_module(name)
            for module in pkgutil.walk_packages(package.__path__, f"{name}."):
                with contextlib.suppress(ImportError):
                    importlib.import_module(module.name)
    for name in _PRELOAD_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def needs_bind_capability(cfg: Config) -> bool:
    """Whether a listener's port is one only privileged processes may bind."""
    try:
        start = int(_UNPRIVILEGED_PORT_START.read_text())
    except (OSError, ValueError):
        start = 1024
    return any(
        address.port < start
        for service in (cfg.submission, cfg.submissions, cfg.smarthost)
        for address in service.listen
    )


def drop_capabilities() -> None:
    """Drop every capability this (non-root) process holds: called once its sockets are bound."""
    if os.geteuid() == 0 or not _holds_capabilities():
        return  # root without [server] user keeps root; nothing held, nothing to drop
    _require_one_thread()
    _set_capabilities(ctypes.CDLL(None, use_errno=True), 0)


def _holds_capabilities() -> bool:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return True
    return any(
        line.split(":")[0] in ("CapEff", "CapPrm") and int(line.split()[1], 16) != 0
        for line in status.splitlines()
    )


def _require_one_thread() -> None:
    # capset(2) changes the calling thread only; a second thread would keep what we drop.
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return
    if len(tasks) != 1:
        raise RuntimeError(f"privilege change with {len(tasks)} threads running")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _set_capabilities(libc: ctypes.CDLL, mask: int) -> None:
    """Effective and permitted sets = `mask` (capabilities 0-31), nothing inheritable; lowering
    the permitted set also empties the ambient set."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)(_CapData(mask, mask, 0), _CapData(0, 0, 0))
    _check(libc.capset(ctypes.byref(header), data), "capset")


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")

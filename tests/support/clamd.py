"""A real clamd for tests: our own child process, our own tiny signature database.

Owns: starting Debian's clamd (package clamav-daemon) in the foreground with a temporary
configuration, a signature database written here (the EICAR test file as a body signature
in a .ndb file and as a hash in a .hdb file: no download, no freshclam), listening on a free
loopback TCP port and on a Unix socket; waiting for it with a bounded PING/PONG poll; and
stopping it by its PID. Must not: touch the system clamd, its database or its sockets, or
listen anywhere but 127.0.0.1.

    with running_clamd(tmp_path) as clamd:
        cfg = ScannerConfig(clamd=clamd.tcp_spec)       # or clamd.unix_spec
        ...
        clamd.stop()                                     # e.g. to test 451 4.7.1; idempotent

With a two-signature database and bytecode off, clamd answers PONG about 0.1 s after start.
clamd keeps the user it was started as when the configuration names no `User`, so it can
read the temporary directory whether the tests run as root (CI) or not.

The EICAR test string is assembled from two halves so that this file is not itself detected.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.ports import free_port
from tests.support.waiting import wait_for

# The 68-byte EICAR anti-virus test file (https://www.eicar.org), in two halves.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_SIGNATURE = "Eicar-Test-Signature"
# clamd appends ".UNOFFICIAL" to names from databases that are not signed by Cisco-Talos.
EICAR_FOUND_NAME = f"{EICAR_SIGNATURE}.UNOFFICIAL"

DEFAULT_STREAM_MAX_LENGTH = 26214400  # clamd's default StreamMaxLength, = scanner.max_stream_size
START_TIMEOUT = 30.0  # seconds; typical start is ~0.1 s, a loaded CI machine may be slower
STOP_TIMEOUT = 10.0
_UNIX_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin


@dataclass
class ClamdHandle:
    """A running clamd started by `running_clamd`.

    tcp_spec / unix_spec: values for `scanner.clamd` ("tcp:127.0.0.1:PORT", "unix:/path").
    """

    pid: int
    port: int
    socket_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def tcp_spec(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    @property
    def unix_spec(self) -> str:
        return f"unix:{self.socket_path}"

    @property
    def is_running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM our clamd by PID, wait (bounded), SIGKILL if it lingers. Idempotent."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.process.wait(timeout=STOP_TIMEOUT)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def clamd_binary() -> str:
    """The clamd executable (Debian installs it in /usr/sbin, which may not be on PATH)."""
    found = shutil.which("clamd") or shutil.which("clamd", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise RuntimeError(
            "clamd not found: install Debian's clamav-daemon (scripts/install-test-deps does)"
        )
    return found


def write_database(directory: Path) -> None:
    """The test signature database: EICAR anywhere in a scanned object, and as a whole file."""
    directory.mkdir(parents=True, exist_ok=True)
    # .ndb body signature: Name:TargetType:Offset:HexSignature (0 = any type, * = anywhere).
    (directory / "mailgate-test.ndb").write_text(f"{EICAR_SIGNATURE}:0:*:{EICAR.hex()}\n")
    # .hdb hash signature: MD5:Size:Name.
    md5 = hashlib.md5(EICAR, usedforsecurity=False).hexdigest()
    (directory / "mailgate-test.hdb").write_text(f"{md5}:{len(EICAR)}:{EICAR_SIGNATURE}\n")


def _config(workdir: Path, socket_path: Path, port: int, stream_max_length: int,
            settings: dict[str, str]) -> str:  # fmt: skip
    defaults = {
        "MaxScanSize": str(max(stream_max_length * 4, 100 * 1024 * 1024)),
        "MaxFileSize": str(max(stream_max_length, 25 * 1024 * 1024)),
        # What docs/SECURITY.md asks of a production clamd: a limit that stops a scan is
        # reported (Heuristics.Limits.Exceeded.*), never answered "OK".
        "AlertExceedsMax": "yes",
        "HeuristicAlerts": "yes",
    }
    return "\n".join(
        [
            f"DatabaseDirectory {workdir / 'db'}",
            f"TemporaryDirectory {workdir / 'tmp'}",
            f"LogFile {workdir / 'clamd.log'}",
            f"LocalSocket {socket_path}",
            "LocalSocketMode 600",
            "FixStaleSocket yes",
            "TCPAddr 127.0.0.1",
            f"TCPSocket {port}",
            "Foreground yes",
            "Bytecode no",  # no bytecode engine: start in ~0.1 s instead of seconds
            "SelfCheck 0",  # never reload the database behind the tests' back
            f"StreamMaxLength {stream_max_length}",
            "MaxThreads 4",
            "ReadTimeout 30",
            "CommandReadTimeout 10",
            "IdleTimeout 30",
            "ScanMail yes",
            "ScanArchive yes",
            "LogTime yes",
            *(f"{k} {v}" for k, v in {**defaults, **settings}.items()),
            "",
        ]
    )


def _ping_unix(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(str(path))
            s.sendall(b"zPING\0")
            return s.recv(16) == b"PONG\0"
    except OSError:
        return False


def _ping_tcp(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(b"zPING\0")
            return s.recv(16) == b"PONG\0"
    except OSError:
        return False


def _start(workdir: Path, socket_path: Path, stream_max_length: int,
           settings: dict[str, str]) -> ClamdHandle:  # fmt: skip
    port = free_port()
    conf = workdir / "clamd.conf"
    conf.write_text(_config(workdir, socket_path, port, stream_max_length, settings))
    log_path = workdir / "clamd.log"
    stderr = (workdir / "clamd.stderr").open("wb")
    try:
        process = subprocess.Popen(
            [clamd_binary(), "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
        )
    finally:
        stderr.close()
    handle = ClamdHandle(process.pid, port, socket_path, log_path, process)
    try:
        # Stop waiting as soon as clamd exits: it will never answer then.
        wait_for(
            lambda: process.poll() is not None or (_ping_unix(socket_path) and _ping_tcp(port)),
            timeout=START_TIMEOUT,
            interval=0.02,
            what="clamd to answer PING",
        )
    except TimeoutError:
        pass
    else:
        if process.poll() is None:
            return handle
    handle.stop()
    detail = (workdir / "clamd.stderr").read_text(errors="replace")[-2000:]
    raise RuntimeError(
        f"clamd did not answer PING within {START_TIMEOUT:g} s (exit {process.returncode}):"
        f"\n{handle.log_text()[-2000:]}\n{detail}"
    )


@contextlib.contextmanager
def running_clamd(
    tmpdir: Path,
    *,
    stream_max_length: int = DEFAULT_STREAM_MAX_LENGTH,
    settings: dict[str, str] | None = None,
) -> Iterator[ClamdHandle]:
    """Start a clamd under `tmpdir` (config, database, log); stop it on exit. `settings` adds
    or overrides clamd.conf directives, e.g. {"MaxRecursion": "2"} to test its limits.

    The Unix socket goes in `tmpdir` unless that path would be too long for sun_path, then in
    a short temporary directory removed on exit. A TCP port taken between our probe and
    clamd's bind makes clamd exit; we then try again with another port (three times).
    """
    workdir = Path(tmpdir) / "clamd"
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    write_database(workdir / "db")
    short_dir: str | None = None
    socket_path = workdir / "clamd.sock"
    if len(str(socket_path)) > _UNIX_PATH_MAX:
        short_dir = tempfile.mkdtemp(prefix="mgclamd-")
        socket_path = Path(short_dir) / "clamd.sock"
    try:
        handle: ClamdHandle | None = None
        for attempt in range(3):
            try:
                handle = _start(workdir, socket_path, stream_max_length, settings or {})
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        assert handle is not None
        try:
            yield handle
        finally:
            handle.stop()
    finally:
        if short_dir is not None:
            shutil.rmtree(short_dir, ignore_errors=True)

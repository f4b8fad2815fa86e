"""A real `mailgate serve` process for end-to-end tests.

`Gateway` runs `mailgate init` in a folder, rewrites the configuration for free loopback ports
(and whatever a test overrides), starts `mailgate serve` as a child process and waits for every
listener's greeting with a bounded timeout. Stop it with `stop()` (SIGTERM) or `kill()` (SIGKILL).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from mailgate import config
from mailgate.spool import open_store
from mailgate.spool.api import SpoolStore
from mailgate.spool.entry import Envelope
from tests.support.ports import accepts, free_port
from tests.support.processes import start_logged, terminate
from tests.support.waiting import wait_for

HOSTNAME = "mail.example.org"
_LOADED = r"mailgate\[(\d+)\] \S+: directory loaded generation=\d+ users=\d+ domains=(\d+)"
DEFAULT_DOMAIN = "example.org"


def toml_dumps(data: dict[str, Any]) -> str:
    """Enough TOML for mailgate.toml: top-level scalars, then one table per section."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):  # an inline table ([delivery] tls = { ... })
            return "{ " + ", ".join(f"{value(k)} = {value(x)}" for k, x in v.items()) + " }"
        raise TypeError(type(v))

    def tables(prefix: str, table: dict[str, Any]) -> list[str]:
        out = [f"{k} = {value(v)}" for k, v in table.items() if not isinstance(v, dict)]
        for name, inner in table.items():
            if isinstance(inner, dict):  # [section] or [section.table]
                out += [f"\n[{prefix}{name}]", *tables(f"{prefix}{name}.", inner)]
        return out

    return "\n".join(tables("", data)) + "\n"


def run_cli(config: Path, *args: str, stdin: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "mailgate", "-c", str(config), *args],
        input=stdin, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"mailgate {' '.join(args)} failed: {proc.stderr}")
    return proc


class Gateway:
    def __init__(self, root: Path, overrides: dict[str, dict[str, Any]] | None = None,
                 init_args: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.root = root
        self.config = root / "mailgate.toml"
        self.log_path = root / "mailgate.log"
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "mailgate", "init", str(root), "--hostname", HOSTNAME,
             "--default-domain", DEFAULT_DOMAIN, *init_args],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.ports = {
            "submission": free_port(),
            "submissions": free_port(),
            "smarthost": free_port(),
        }
        data = tomllib.loads(self.config.read_text())
        for service, port in self.ports.items():
            data.setdefault(service, {})["listen"] = [f"127.0.0.1:{port}"]
        data["smarthost"]["networks"] = ["127.0.0.0/8"]
        data.setdefault("delivery", {})["relay"] = ""
        for section, values in (overrides or {}).items():
            data.setdefault(section, {}).update(values)
        self.settings = data
        self.write_config()

    def write_config(self) -> None:
        self.config.write_text(toml_dumps(self.settings))

    @property
    def spool(self) -> Path:
        return self.root / str(self.settings.get("spool", {}).get("path", "spool"))

    def cli(self, *args: str, stdin: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
        return run_cli(self.config, *args, stdin=stdin, check=check)

    def add_user(self, login: str, password: str, address: str | None = None) -> None:
        extra = ["--address", address] if address else []
        self.cli("user", "add", login, *extra, "--password-stdin", stdin=password + "\n")

    def start(self, *extra: str) -> None:
        env = dict(os.environ, MAILGATE_LOG_LEVEL="INFO", PYTHONUNBUFFERED="1")
        self.proc = start_logged(
            [sys.executable, "-m", "mailgate", "-c", str(self.config), "serve", *extra],
            self.log_path, env,
        )  # fmt: skip
        for port in self.ports.values():
            wait_for(partial(self._greets, port), timeout=20, what=f"listener on {port}")
        for address in self.settings.get("admin", {}).get("listen", []):  # [admin] listen
            port = int(address.rsplit(":", 1)[1])
            wait_for(partial(self._greets, port), timeout=20, what=f"admin listener on {port}")

    def _greets(self, port: int) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"mailgate serve exited: {self.log_text()[-2000:]}")
        return accepts(port)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None

    def finish(self) -> None:
        """Stop, then print the end of the log: pytest shows it only when the test failed."""
        self.stop()
        print(self.log_text()[-6000:])

    def kill(self) -> None:
        """SIGKILL the supervisor and every worker at once (its own process group)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def wait_directory(self, *, domains: int, timeout: float = 15) -> None:
        """Wait until every listener worker's directory view has `domains` domains: a change
        made with the CLI reaches a running server by the view's poll, not at once."""

        def every_worker_has_them() -> bool:
            log = self.log_text()
            workers = set(re.findall(r"worker started index=\d+ pid=(\d+)", log))
            # the last "directory loaded" line of each process wins
            loaded = dict(re.findall(_LOADED, log))
            return bool(workers) and all(int(loaded.get(pid, -1)) >= domains for pid in workers)

        wait_for(
            every_worker_has_them, timeout=timeout, what=f"the workers' view of {domains} domains"
        )

    def pids(self) -> set[int]:
        """The supervisor and its workers."""
        assert self.proc is not None
        out = subprocess.run(["ps", "-o", "pid=", "-g", str(self.proc.pid)],
                             capture_output=True, text=True, check=False).stdout  # fmt: skip
        return {int(p) for p in out.split()}

    def store(self) -> SpoolStore:
        """The spool, through the same API the server and the CLI use (any backend)."""
        return open_store(config.load(self.config, check_files=False).spool)

    def queued(self) -> list[str]:
        """Queue ids of the committed entries."""
        return self.store().ids()

    def envelope(self, qid: str) -> Envelope:
        return self.store().load(qid)

    def message(self, qid: str) -> bytes:
        return self.store().read_message(qid)


@contextlib.contextmanager
def started(*gateways: Gateway, args: tuple[str, ...] = ("--no-delivery",)) -> Iterator[None]:
    """Start each gateway in turn; finish every one that started, whatever happens."""
    with contextlib.ExitStack() as stack:
        for gw in gateways:
            gw.start(*args)
            stack.callback(gw.finish)
        yield

"""The README's quick start, and `pipx install .`, with only the system's directories on PATH.

Debian's python3 is externally managed (PEP 668): `pip install` into it is refused. These tests
run what a new user runs, in a copy of the working tree, with PATH=/usr/sbin:/usr/bin:/sbin:/bin
so that the system's python3 is the one found:

- `scripts/demo` must build its own virtual environment (.venv, made by that python3), start
  the gateway and its sink, and a message sent with swaks as the demo prints it must land in
  demo/delivered/;
- `pipx install .` (docs/INSTALL.md) must give a working `mailgate` command.

Slow (each installs mailgate's dependencies into a new virtual environment; pip's cache helps).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ports import accepts, free_base
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
DEMO_OFFSETS = (25, 26, 465, 587)  # smart host, sink, submissions, submission
INSTALL_TIMEOUT = 600.0  # a new virtual environment with mailgate's dependencies


def system_env(**extra: str) -> dict[str, str]:
    """A new user's environment: the system PATH, HOME, and pip's own settings if any."""
    env = {"PATH": SYSTEM_PATH, "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    env.update({k: v for k, v in os.environ.items()
                if k.startswith("PIP_") or k.lower() in ("http_proxy", "https_proxy")})  # fmt: skip
    env.update(extra)
    return env


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """The working tree's tracked files (with uncommitted changes), as a fresh clone has them."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True, timeout=60).stdout.split(b"\0")  # fmt: skip
    target = tmp_path / "clone"
    for name in filter(None, files):
        source = ROOT / os.fsdecode(name)
        if source.is_file():
            (target / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / os.fsdecode(name))
    return target


@pytest.fixture
def demo(clone: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    base = free_base(DEMO_OFFSETS)
    log = clone / "demo.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["scripts/demo"], cwd=clone, env=system_env(MAILGATE_DEMO_PORT_BASE=str(base)),
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        yield proc, base, log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        print(log.read_text(errors="replace")[-4000:])


def _listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"scripts/demo exited {proc.returncode}: "
                             f"{log.read_text(errors='replace')[-3000:]}")  # fmt: skip
    return accepts(port)


def test_quick_start_with_the_system_python(
    demo: tuple[subprocess.Popen[bytes], int, Path], clone: Path
) -> None:
    proc, base, log = demo
    submission = base + 587
    wait_for(lambda: _listening(proc, submission, log), timeout=INSTALL_TIMEOUT, interval=0.5,
             what=f"scripts/demo listening on {submission}")  # fmt: skip
    wait_for(lambda: _listening(proc, base + 26, log), timeout=30, what="the demo's sink")
    # It built its own environment, with the system's python3, and tells how to send.
    venv_python = (clone / ".venv" / "bin" / "python3").resolve()
    assert venv_python.parent == Path("/usr/bin"), venv_python
    printed = log.read_text(errors="replace")
    command = re.search(r"swaks --server 127\.0\.0\.1:(\d+) --tls .*", printed)
    assert command and int(command[1]) == submission, printed[-3000:]

    sent = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{submission}", "--tls", "--auth-user", "demo",
         "--auth-password", "demo password", "--from", "demo@example.org",
         "--to", "someone@example.net"],
        env=system_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    queued = re.search(r"^<~  250 2\.0\.0 Ok: queued as (\w+)$", sent.stdout, re.M)
    assert queued, sent.stdout[-3000:] + sent.stderr
    delivered = clone / "demo" / "delivered"
    (saved,) = wait_for(lambda: list(delivered.glob("*.eml")), timeout=60,
                        what="the first message in demo/delivered/")  # fmt: skip
    text = saved.read_text(errors="replace")
    assert f"id {queued[1]}" in text  # the Received: header mailgate added names the queue id
    assert "From: demo@example.org" in text


def test_pipx_install(clone: Path, tmp_path: Path) -> None:
    pipx = shutil.which("pipx", path=SYSTEM_PATH)
    assert pipx, "pipx is missing: scripts/install-test-deps installs it"
    home, bin_dir = tmp_path / "pipx", tmp_path / "bin"
    env = system_env(PIPX_HOME=str(home), PIPX_BIN_DIR=str(bin_dir))
    proc = subprocess.run([pipx, "install", "."], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=INSTALL_TIMEOUT, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    mailgate = str(bin_dir / "mailgate")
    gw = tmp_path / "gw"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([mailgate, *args], env=env, capture_output=True, text=True,
                              timeout=60, check=False)  # fmt: skip

    init = run("init", str(gw), "--hostname", "mail.example.org")
    assert init.returncode == 0, init.stderr
    check = run("-c", str(gw / "mailgate.toml"), "check-config")
    assert (check.returncode, check.stdout, check.stderr) == (0, f"ok: {gw}/mailgate.toml\n", "")

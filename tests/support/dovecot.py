"""A real Dovecot auth service (Debian's `dovecot-core`) with a throwaway configuration.

`DovecotAuth(folder, users)` writes a dovecot.conf with no mail protocols, a passwd-file passdb
(`users`: login -> password, or login -> (password, extra fields)), and the auth service's
client listener on a unix socket (`unix_spec`) and on a loopback TCP port (`tcp_spec`).
`start()` runs `dovecot -F` in the foreground until `stop()`.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.ports import accepts, free_port
from tests.support.processes import start_logged, terminate
from tests.support.waiting import wait_for

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"


@dataclass
class DovecotAuth:
    folder: Path
    users: dict[str, str | tuple[str, str]]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for sub in ("run", "state"):
            (self.folder / sub).mkdir(exist_ok=True)
        lines = []
        for login, entry in self.users.items():
            password, extra = (entry, "") if isinstance(entry, str) else entry
            # passwd-file: user:password:uid:gid:gecos:home:shell:extra_fields
            lines.append(f"{login}:{{PLAIN}}{password}::::::{extra}")
        (self.folder / "users").write_text("\n".join(lines) + "\n")
        f = self.folder
        (f / "dovecot.conf").write_text(f"""\
base_dir = {f / "run"}
state_dir = {f / "state"}
log_path = {f / "dovecot.log"}
protocols =
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
passdb {{
  driver = passwd-file
  args = {f / "users"}
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home=/nonexistent
}}
service auth {{
  user = root
  unix_listener {f / "auth-client"} {{
    mode = 0600
  }}
  inet_listener {{
    address = 127.0.0.1
    port = {self.port}
  }}
}}
service anvil {{
  chroot =
}}
""")

    @property
    def unix_spec(self) -> str:
        return f"unix:{self.folder / 'auth-client'}"

    @property
    def tcp_spec(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = start_logged(
            [DOVECOT, "-F", "-c", str(self.folder / "dovecot.conf")], self.folder / "out.log"
        )
        wait_for(self._listens, timeout=20, what="dovecot auth listening")

    def _listens(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"dovecot exited: {(self.folder / 'out.log').read_text()[-2000:]}")
        return accepts(self.port) and (self.folder / "auth-client").exists()

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None

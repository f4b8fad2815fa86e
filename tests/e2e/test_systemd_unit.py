"""packaging/mailgate.service: systemd accepts it, and its hardening is what docs/INSTALL.md says.

`systemd-analyze verify` checks the unit as systemd would load it (with the ExecStart path
pointed at this installation's `mailgate`, since /usr/local/bin/mailgate need not exist here);
`systemd-analyze security --offline=yes` scores it. scripts/install-test-deps installs systemd,
whose tools work without systemd running as init.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "packaging" / "mailgate.service"
MAX_EXPOSURE = 2.0  # "OK" in systemd-analyze's words; docs/INSTALL.md gives the score

pytestmark = pytest.mark.e2e


def settings() -> dict[str, list[str]]:
    """Key -> every value it is given (a key may repeat), across the unit's sections."""
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line.strip() and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_the_unit_runs_serve_as_a_notify_service_of_the_account_init_system_makes() -> None:
    s = settings()
    assert s["Type"] == ["notify"]
    assert s["ExecStart"] == ["/usr/local/bin/mailgate -c /etc/mailgate/mailgate.toml serve"]
    assert s["ExecStartPre"] == [
        "/usr/local/bin/mailgate -c /etc/mailgate/mailgate.toml check-config"
    ]
    assert s["User"] == ["mailgate"]
    assert s["Group"] == ["mailgate"]
    assert s["Restart"] == ["on-failure"]
    assert s["WantedBy"] == ["multi-user.target"]


def test_the_hardening_settings() -> None:
    s = settings()
    expected = {
        "AmbientCapabilities": ["CAP_NET_BIND_SERVICE"],
        "CapabilityBoundingSet": ["CAP_NET_BIND_SERVICE"],
        "NoNewPrivileges": ["yes"],
        "ProtectSystem": ["strict"],
        "ReadWritePaths": ["/var/lib/mailgate /var/spool/mailgate"],
        "PrivateTmp": ["yes"],
        "ProtectHome": ["yes"],
        "PrivateDevices": ["yes"],
        "UMask": ["0077"],
        "RestrictAddressFamilies": ["AF_INET AF_INET6 AF_UNIX"],
        "RestrictSUIDSGID": ["yes"],
        "MemoryDenyWriteExecute": ["yes"],
        "SystemCallArchitectures": ["native"],
    }
    assert {k: s.get(k) for k in expected} == expected
    assert s["SystemCallFilter"][0] == "@system-service"


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: scripts/install-test-deps installs systemd"
    return tool


def test_systemd_analyze_verify_accepts_it(tmp_path: Path) -> None:
    mailgate = Path(sys.executable).with_name("mailgate")
    assert mailgate.is_file()
    unit = tmp_path / "mailgate.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/mailgate", str(mailgate)))
    proc = subprocess.run([_systemd_analyze(), "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert (proc.returncode, proc.stderr) == (0, "")


def test_systemd_analyze_security_score() -> None:
    proc = subprocess.run([_systemd_analyze(), "security", "--offline=yes", str(UNIT)],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    match = re.search(r"Overall exposure level for mailgate\.service: ([0-9.]+) (\w+)",
                      proc.stdout)  # fmt: skip
    assert match, proc.stdout[-2000:] + proc.stderr
    assert float(match[1]) <= MAX_EXPOSURE, match[0]
    install = (UNIT.parents[1] / "docs" / "INSTALL.md").read_text()
    assert f"exposure level {match[1]} ({match[2]})" in install  # the documented score is true

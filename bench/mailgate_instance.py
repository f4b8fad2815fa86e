"""Create a mailgate instance shaped like the reference harness's Postfix anchor.

    python3 bench/mailgate_instance.py DIR [--workers N] [--clamd SPEC] [--state redis://...]
                                           [--state-prefix P] [--pin-clients auto|yes|no]
                                           [--ports S,SUB,SUBS]

Ports 10225 (smart host), 10287 (submission), 10265 (submissions) on 127.0.0.1 (--ports
changes them); user
bench/benchpass; 127.0.0.0/8 may relay; every message relayed to 127.0.0.1:10026 (the harness's
sink); connection limits raised for the idle scenario; rate limits, the account breaker and the
AUTH defence's thresholds out of reach (the load generator is one client sending thousands of
messages over parallel AUTH sessions, which they exist to stop; they still count everything).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.gateway import toml_dumps


def make_instance(
    folder: Path,
    *,
    workers: int | None = None,
    clamd: str = "",
    relay: str = "127.0.0.1:10026",
    state: str = "",
    state_prefix: str = "mailgate-bench:",
    pin_clients: str = "auto",
    ports: tuple[int, int, int] = (10225, 10287, 10265),
) -> Path:
    """Make the instance in `folder`; its configuration file."""
    mg = [sys.executable, "-m", "mailgate"]
    subprocess.run([*mg, "init", str(folder), "--hostname", "mail.bench.test",
                    "--default-domain", "bench.test"], check=True, capture_output=True)  # fmt: skip
    config = folder / "mailgate.toml"
    data = tomllib.loads(config.read_text())
    smarthost, submission, submissions = ports
    data["submission"]["listen"] = [f"127.0.0.1:{submission}"]
    data["submissions"]["listen"] = [f"127.0.0.1:{submissions}"]
    data["smarthost"] = {"listen": [f"127.0.0.1:{smarthost}"], "networks": ["127.0.0.0/8"]}
    data.setdefault("delivery", {})["relay"] = relay
    data.setdefault("limits", {}).update(max_connections=20000, max_connections_per_ip=20000)
    data.setdefault("ratelimits", {})["breaker_recipients_per_hour"] = 0
    # Twenty parallel AUTHs from one address, each counted while it is in flight, are what the
    # AUTH defence refuses (454 4.7.0, then a kernel ban): the load generator is one client.
    data["ratelimits"].update(
        auth_delay_after=10000, auth_refuse_after=10000, auth_login_refuse_after=10000,
        auth_parallel_per_client=1000, auth_parallel_per_login=1000, auth_ban_after=0,
    )  # fmt: skip
    data.setdefault("scanner", {})["clamd"] = clamd
    data["server"] = {"pin_clients": pin_clients}
    if workers is not None:
        data["server"]["workers"] = workers
    if state:
        data["state"] = {"url": state, "prefix": state_prefix}
    config.write_text(toml_dumps(data))
    subprocess.run([*mg, "-c", str(config), "user", "add", "bench", "--password-stdin"],
                   input=b"benchpass\n", check=True, capture_output=True)  # fmt: skip
    return config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--clamd", default="")
    ap.add_argument("--relay", default="127.0.0.1:10026")
    ap.add_argument("--state", default="", help="[state] url (shared counters in Redis)")
    ap.add_argument("--state-prefix", default="mailgate-bench:", help="[state] prefix")
    ap.add_argument("--pin-clients", default="auto", choices=("auto", "yes", "no"))
    ap.add_argument("--ports", default="10225,10287,10265", help="smart host,sub,subs")
    a = ap.parse_args()
    s, sub, subs = (int(p) for p in a.ports.split(","))
    config = make_instance(a.dir, workers=a.workers, clamd=a.clamd, relay=a.relay, state=a.state,
                           state_prefix=a.state_prefix, pin_clients=a.pin_clients,
                           ports=(s, sub, subs))  # fmt: skip
    print(config)


if __name__ == "__main__":
    main()

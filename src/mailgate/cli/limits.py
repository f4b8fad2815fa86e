"""`mailgate limits report [--json] [--top N]`: the top senders against each rate limit.

Owns: reading <spool>/limits.json (written by `mailgate serve` every `ratelimits.
snapshot_interval` seconds and at shutdown) and printing it. Must not: compute counters itself
or talk to the running server; it works while the server is stopped (showing the last
snapshot and its age). Keys and logins come from clients, so they are made printable before
being shown as text.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailgate.cli.common import CommandError, load_config, print_json
from mailgate.config import RATE_LIMIT_NAMES
from mailgate.limits.keys import printable
from mailgate.limits.rate import SERVICES
from mailgate.limits.snapshot import read_snapshot, snapshot_path


def register(sub: Any) -> None:
    parser = sub.add_parser("limits", help="sending rate limits")
    actions = parser.add_subparsers(dest="limits_command", metavar="ACTION", required=True)
    report = actions.add_parser(
        "report", help="top senders against each rate limit, refusals, breaker trips, AUTH"
    )
    report.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    report.add_argument(
        "--top", type=_positive, default=10, help="keys shown per limit (default 10)"
    )
    report.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    path = snapshot_path(cfg.spool.path)
    # With [server] workers = N, worker i > 0 writes limits.w<i>.json beside limits.json; each
    # worker counts the client addresses steered to it (exact per IP, per worker for logins).
    paths = [path, *sorted(path.parent.glob(f"{path.stem}.w*{path.suffix}"))]
    snapshots: list[tuple[Path, dict[str, Any]]] = []
    for p in paths:
        try:
            snapshots.append((p, read_snapshot(p)))
        except FileNotFoundError:
            if p == path:
                raise CommandError(
                    f"no rate-limit snapshot at {path} (mailgate serve writes one every "
                    f"{cfg.ratelimits.snapshot_interval:g} s)"
                ) from None
        except (OSError, ValueError) as e:
            raise CommandError(f"{p}: cannot read the snapshot: {e}") from None
    if args.json:
        if len(snapshots) == 1:
            print_json(snapshots[0][1])
        else:
            print_json({"workers": [data for _, data in snapshots]})
        return 0
    for index, (p, data) in enumerate(snapshots):
        if len(snapshots) > 1:
            sys.stdout.write(f"{'' if index == 0 else chr(10)}== worker {index} ({p.name})\n")
        try:
            text = format_report(data, top=args.top, now=datetime.now(UTC))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CommandError(f"{p}: malformed snapshot ({type(e).__name__}: {e})") from None
        sys.stdout.write(text)
    return 0


def format_report(data: dict[str, Any], *, top: int, now: datetime) -> str:
    """The snapshot as text, one block per limit:

    login_recipients_per_hour  submission=500 submissions=500 smarthost=off  refused=3 ...
         412  alice
    """
    written_at = datetime.fromisoformat(data["written_at"])
    age = max(0, round((now - written_at).total_seconds()))
    lines = [
        f"Rate limits snapshot of {written_at.isoformat()} ({age} s ago); "
        f"counts over the last {float(data['window_seconds']):g} s, "
        "refusals since the server started.",
        "",
    ]
    for name, entry in _ordered(data["limits"], RATE_LIMIT_NAMES):
        services = dict(_ordered(entry["services"], SERVICES))
        settings = " ".join(
            f"{printable(svc)}={_limit_text(s['max'], s['shadow'])}" for svc, s in services.items()
        )
        refused = sum(int(s["refused"]) for s in services.values())
        shadow = sum(int(s["would_refuse"]) for s in services.values())
        lines.append(f"{name}  {settings}  refused={refused} would_refuse={shadow}")
        lines.extend(
            f"  {int(row['count']):>8}  {printable(row['key'])}"
            for row in entry.get("top", [])[:top]
        )
    breaker = data.get("breaker")
    if breaker is not None:
        lines += [
            "",
            f"breaker  recipients_per_hour={_limit_text(breaker['recipients_per_hour'])} "
            f"messages_per_hour={_limit_text(breaker['messages_per_hour'])} "
            f"refused={int(breaker['refused'])}",
        ]
        for trip in breaker["tripped"]:
            state = "active" if trip["active"] else "cleared"
            lines.append(
                f"  {trip['at']}  {printable(trip['login'])}  {printable(trip['reason'])}  {state}"
            )
    auth = data.get("auth")
    if auth is not None:
        lines += ["", f"failed AUTH over the last {float(auth['window_seconds']):g} s"]
        for label in ("clients", "logins"):
            lines.append(f" {label}:")
            lines.extend(
                f"  {int(row['failures']):>8}  {printable(row['key'])}  {row['state']}"
                for row in auth[label][:top]
            )
    return "\n".join(lines) + "\n"


def _ordered(table: dict[str, Any], order: tuple[str, ...]) -> list[tuple[str, Any]]:
    """Known names in their configuration order, then any others (a newer server) by name."""
    rank = {name: n for n, name in enumerate(order)}
    return sorted(table.items(), key=lambda item: (rank.get(item[0], len(order)), item[0]))


def _limit_text(value: int, shadow: bool = False) -> str:
    text = str(int(value)) if value else "off"
    return f"{text}(shadow)" if shadow and value else text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value

"""`mailgate status [--json]`: the service at a glance, for the operator on duty.

The queue by state (from the spool), accepted, refused, delivered, deferred and bounced in
the last hour, the top senders by login and by client network in that hour (the abuse view:
one compromised account or one infected lab stands out), and the suspended accounts. Works
whether or not the server runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from mailgate.cli.common import load_config, open_directory, print_json
from mailgate.spool import open_store, spool_exists
from mailgate.spool.entry import QUEUE_STATES, utcnow
from mailgate.status import last_hour, queue_figures, suspended_logins


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="queue, last hour's traffic, top senders, suspended")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--top", type=int, default=10, help="how many top senders (default 10)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    now = utcnow()
    figures = queue_figures(open_store(cfg.spool), now) if spool_exists(cfg.spool) else None
    queue = figures.counts if figures else dict.fromkeys(QUEUE_STATES, 0)
    summary = last_hour(cfg.trace.path, top=args.top)
    suspended = suspended_logins(open_directory(cfg))
    out: dict[str, Any] = {
        "queue": queue,
        "oldest_seconds": figures.oldest_seconds if figures else 0,
        "last_hour": summary.counts,
        "top_logins": [
            {"login": k, "messages": n, "recipients": r} for k, n, r in summary.top_logins
        ],
        "top_networks": [
            {"network": k, "messages": n, "recipients": r} for k, n, r in summary.top_networks
        ],
        "suspended": suspended,
    }
    if args.json:
        print_json(out)
        return 0
    print("queue:      " + "  ".join(f"{k}={v}" for k, v in queue.items())
          + f"  oldest={out['oldest_seconds']}s")  # fmt: skip
    print("last hour:  " + "  ".join(f"{k}={v}" for k, v in summary.counts.items()))
    print("top logins (messages, recipients in the last hour):")
    for login, n, r in summary.top_logins or [("-", 0, 0)]:
        print(f"  {login:<32} {n:>7} {r:>7}")
    print("top client networks:")
    for net, n, r in summary.top_networks or [("-", 0, 0)]:
        print(f"  {net:<32} {n:>7} {r:>7}")
    print("suspended:  " + (" ".join(suspended) if suspended else "none"))
    return 0

"""`mailgate trace QUERY [--json]`: every event of the matching messages.

QUERY is a queue id, a Message-ID (with or without <>), a sender or recipient address, or a
login. The events come from the trace log (tracelog/, `[trace] path`), so this works after the
message left the spool, across restarts, and while the server is stopped. Prints one block
per message: a summary line, then one line per event, oldest first.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from mailgate.cli.common import CommandError, load_config, print_json
from mailgate.tracelog.query import MessageTrace, find

# The fields each kind of event shows, in order (the rest are in --json).
_SHOWN = {
    "accepted": ("service", "client", "login", "size", "sid"),
    "rejected": ("service", "client", "login", "reply", "sid"),
    "queued": ("service", "about"),
    "delivered": ("to", "relay", "tls", "delay", "reply"),
    "deferred": ("to", "relay", "tls", "delay", "reply"),
    "bounced": ("to", "relay", "tls", "delay", "reply"),
    "dsn": ("action", "to", "dsn_qid"),
}


def register(sub: Any) -> None:
    p = sub.add_parser("trace", help="every event of a message, by queue id, Message-ID, "
                       "address or login")  # fmt: skip
    p.add_argument("query", help="queue id, Message-ID, sender or recipient address, or login")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    if not args.query.strip():
        raise CommandError("trace: empty query")
    traces = find(cfg.trace.path, args.query)
    if args.json:
        print_json([_json(t) for t in traces])
        return 0 if traces else 1
    if not traces:
        raise CommandError(f"trace: no message matches {args.query!r} in {cfg.trace.path}")
    for i, trace in enumerate(traces):
        if i:
            print()
        print(format_trace(trace))
    return 0


def _json(trace: MessageTrace) -> dict[str, Any]:
    out = trace.to_json()
    for event in out["events"]:
        event["at"] = _when(event["at"])
    return out


def format_trace(trace: MessageTrace) -> str:
    first = trace.first
    head = [f"qid={trace.qid}", f"status={trace.status}"]
    if "mail_from" in first:
        head.append(f"from=<{first['mail_from']}>")
    if first.get("to"):
        to = first["to"] if isinstance(first["to"], list) else [first["to"]]
        head.append("to=" + ",".join(f"<{a}>" for a in to))
    if first.get("message_id"):
        head.append(f"message-id={first['message_id']}")
    lines = [" ".join(head)]
    for event in trace.events:
        fields = [f"{k}={_value(event[k])}" for k in _SHOWN.get(event["kind"], ()) if k in event]
        lines.append(f"  {_when(event['at'])}  {event['kind']:<9} {' '.join(fields)}".rstrip())
    return "\n".join(lines)


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value)
    if not text:
        return "-"
    return f'"{text}"' if " " in text else text

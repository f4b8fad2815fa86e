"""mailgate queue: list, show, flush, hold, release and delete spooled messages.

Owns: the `queue` command's arguments and output. Must not: touch spool files except through
`spool.api.SpoolStore` (which locks the journal, so this works beside a running server, or
without one).
A running engine notices flush/hold/release/delete through the spool's wakeup file.

Output for people is one entry per line (like Postfix's mailq); `--json` gives the same facts
for scripts (JSON escapes control characters itself). Everything a client chose (addresses,
headers, remote replies) goes to the terminal through `text.visible()`, so an ESC sequence in
a Subject is shown as `\x1b[...`, never obeyed by the operator's terminal.
States: "held" (an operator put it on hold), "deferred" (every pending recipient
waits for its retry time), "active" (due now: not yet tried, flushed, or being delivered).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from mailgate import tracelog
from mailgate.cli.common import CommandError, load_config, print_json
from mailgate.errors import SpoolError
from mailgate.spool import open_store, spool_exists
from mailgate.spool.api import NotFound, SpoolStore
from mailgate.spool.entry import Attempt, Envelope, Recipient, utcnow
from mailgate.spool.entry import queue_state as state_of
from mailgate.text import visible


def register(sub: Any) -> None:
    p = sub.add_parser("queue", help="inspect and manage the mail queue")
    qsub = p.add_subparsers(dest="queue_command", metavar="ACTION", required=True)

    ls = qsub.add_parser("list", help="list queued messages")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_list)

    show = qsub.add_parser("show", help="envelope, headers and delivery history of one message")
    show.add_argument("id", metavar="ID")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=_show)

    flush = qsub.add_parser("flush", help="retry now (one message, or all)")
    flush.add_argument("id", metavar="ID", nargs="?")
    flush.set_defaults(func=_flush)

    for name, func, text in (
        ("hold", _hold, "keep a message from being delivered"),
        ("release", _release, "deliver a held message again"),
        ("delete", _delete, "delete a message without a bounce"),
    ):
        q = qsub.add_parser(name, help=text)
        q.add_argument("id", metavar="ID")
        q.set_defaults(func=func)


def _open_store(args: argparse.Namespace) -> SpoolStore:
    cfg = load_config(args)
    path: Path = cfg.spool.path
    # Do not conjure up an empty spool from a mistyped path: that would list "empty" forever.
    if not spool_exists(cfg.spool):
        raise CommandError(f"spool.path: no spool at {path} (run `mailgate init`)")
    return open_store(cfg.spool)


# --- list --------------------------------------------------------------------------------


def _last_error(envelope: Envelope) -> str:
    """The newest non-delivered attempt's reply, else the last reply of an undelivered one."""
    newest: Attempt | None = None
    for r in envelope.recipients:
        for attempt in r.history:
            if attempt.status != "delivered" and (newest is None or attempt.at >= newest.at):
                newest = attempt
    if newest is not None:
        return newest.reply
    for r in envelope.recipients:
        if r.state != "delivered" and r.last_reply:
            return r.last_reply
    return ""


def _undelivered(envelope: Envelope) -> tuple[Recipient, ...]:
    return tuple(r for r in envelope.recipients if r.state != "delivered")


def format_age(age: timedelta) -> str:
    """Largest whole unit: 42s, 5m, 3h, 2d (never negative, even with a skewed clock)."""
    seconds = max(0, int(age.total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _summary(envelope: Envelope, now: datetime) -> dict[str, Any]:
    return {
        "id": envelope.id,
        "state": state_of(envelope, now),
        "sender": envelope.mail_from,
        "recipients": [r.address for r in _undelivered(envelope)],
        "size": envelope.size,
        "received_at": envelope.received_at.isoformat(),
        "age_seconds": max(0, int((now - envelope.received_at).total_seconds())),
        "attempts": max((r.attempts for r in envelope.recipients), default=0),
        "last_error": _last_error(envelope),
    }


def _list(args: argparse.Namespace) -> int:
    store = _open_store(args)
    now = utcnow()
    rows: list[dict[str, Any]] = []
    for qid in store.ids():
        try:
            rows.append(_summary(store.load(qid), now))
        except NotFound:
            continue  # delivered and removed while we listed
        except SpoolError as e:
            print(f"mailgate: {e}", file=sys.stderr)
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("queue is empty")
        return 0
    print(f"{'ID':<14}  {'STATE':<8}  {'AGE':>4}  {'SIZE':>9}  {'TRIES':>5}  SENDER -> RECIPIENTS")
    for row in rows:
        sender = f"<{row['sender']}>"
        age = format_age(timedelta(seconds=row["age_seconds"]))
        print(visible(
            f"{row['id']:<14}  {row['state']:<8}  {age:>4}  {row['size']:>9}  "
            f"{row['attempts']:>5}  {sender} -> {', '.join(row['recipients'])}"
        ))  # fmt: skip
        if row["last_error"]:
            print(visible(f"{'':<16}last error: {row['last_error']}"))
    total = sum(int(row["size"]) for row in rows)
    print(f"-- {len(rows)} {'entry' if len(rows) == 1 else 'entries'}, {total} bytes")
    return 0


# --- show --------------------------------------------------------------------------------


def _when(value: datetime | None) -> str:
    return value.isoformat() if value is not None else "-"


def _show(args: argparse.Namespace) -> int:
    store = _open_store(args)
    envelope = store.load(args.id)
    headers = store.read_headers(args.id).decode("utf-8", "replace")
    if args.json:
        data = _summary(envelope, utcnow())
        data["envelope"] = _envelope_json(envelope)
        data["headers"] = headers
        print_json(data)
        return 0
    now = utcnow()
    lines = [
        f"id:           {envelope.id}",
        f"state:        {state_of(envelope, now)}",
        f"sender:       <{envelope.mail_from}>",
        f"size:         {envelope.size}",
        f"received at:  {envelope.received_at.isoformat()}"
        f" ({format_age(now - envelope.received_at)} ago)",
        f"service:      {envelope.service or '-'}",
        f"login:        {envelope.login or '-'}",
        f"client:       {envelope.client or '-'}",
    ]
    if envelope.is_bounce:
        lines.append("bounce:       yes")
    lines += ["", "recipients:"]
    for r in envelope.recipients:
        lines.append(
            f"  <{r.address}>  {r.state}  attempts={r.attempts}  next={_when(r.next_attempt_at)}"
        )
        if r.last_reply:
            lines.append(f"    last reply: {r.last_reply}")
        for a in r.history:
            host = f" {a.host}" if a.host else ""
            tls = " tls" if a.tls else ""
            lines.append(f"    {a.at.isoformat()} {a.status}{host}{tls}: {a.reply}")
    lines += ["", "headers:"]
    # Split on CRLF only: splitlines() would also break at U+2028, \x1c, a bare CR ...
    lines += ["  " + line for line in headers.rstrip("\r\n").split("\r\n")]
    print("\n".join(visible(line) for line in lines))
    return 0


def _envelope_json(envelope: Envelope) -> Any:
    # The stored form, exactly as in the journal's records.
    return json.loads(envelope.to_json())


# --- changes ---------------------------------------------------------------------------


def _flush(args: argparse.Namespace) -> int:
    store = _open_store(args)
    if args.id is not None:
        store.flush(args.id)
        print(f"flushed {args.id}")
    else:
        count = store.flush()
        print(f"flushed {count} {'entry' if count == 1 else 'entries'}")
    return 0


def _hold(args: argparse.Namespace) -> int:
    _open_store(args).hold(args.id)
    _trace(args, "held")
    print(f"held {args.id}")
    return 0


def _release(args: argparse.Namespace) -> int:
    _open_store(args).release(args.id)
    _trace(args, "released")
    print(f"released {args.id}")
    return 0


def _delete(args: argparse.Namespace) -> int:
    _open_store(args).delete(args.id)
    _trace(args, "deleted")
    print(f"deleted {args.id}")
    return 0


def _trace(args: argparse.Namespace, action: str) -> None:
    """The operator's action goes into the message's trace (`mailgate trace ID`)."""
    tracelog.start(load_config(args).trace)
    tracelog.by_operator(args.id, action)
    tracelog.stop()

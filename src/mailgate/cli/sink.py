"""`mailgate sink`: a local SMTP server that writes every message it receives to a folder.

For trying mailgate out and for testing a configuration: point `[delivery] relay` at it and see
what mailgate would have sent, headers and all, as one .eml file per recipient transaction. It
uses mailgate's own protocol machine (smtp.server) with a profile that offers neither STARTTLS nor
AUTH, accepts every sender and recipient, and listens on loopback unless told otherwise.
Not a mail store: nothing is fsynced, nothing is delivered further.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import time
from pathlib import Path
from typing import Any

from mailgate import log as mglog
from mailgate import replies
from mailgate.cli.common import CommandError
from mailgate.smtp.events import (
    Close,
    DataStart,
    Ehlo,
    EndOfData,
    MailFrom,
    MessageChunk,
    Profile,
    Quit,
    RcptTo,
)  # fmt: skip
from mailgate.smtp.server import NEED_DATA, ServerConnection

log = logging.getLogger("mailgate.sink")
SINK = Profile("sink", offers_starttls=False, implicit_tls=False, offers_auth=False,
               requires_auth=False)  # fmt: skip
_counter = itertools.count(1)


def register(sub: Any) -> None:
    p = sub.add_parser("sink", help="a local SMTP server that saves what it receives to files")
    p.add_argument("--listen", default="127.0.0.1:2526", help="HOST:PORT (default %(default)s)")
    p.add_argument("--dir", required=True, type=Path, help="folder for the .eml files")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    mglog.setup()
    host, _, port = str(args.listen).rpartition(":")
    if not host or not port.isdigit():
        raise CommandError(f"--listen: expected HOST:PORT, got {args.listen!r}")
    args.dir.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(_serve(host.strip("[]"), int(port), args.dir))
    except OSError as e:
        raise CommandError(f"--listen: cannot listen on {args.listen}: {e.strerror}") from None
    return 0


async def _serve(host: str, port: int, folder: Path) -> None:
    server = await asyncio.start_server(lambda r, w: _session(r, w, folder), host, port)
    log.info("sink listening on %s:%d, saving to %s", host, port, folder)
    async with server:
        await server.serve_forever()


async def _session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   folder: Path) -> None:  # fmt: skip
    conn = ServerConnection(SINK, "sink.localhost", max_message_size=64 * 1024 * 1024)
    conn.start()
    mail_from, rcpts, chunks = "", list[str](), list[bytes]()
    try:
        while not conn.is_closed:
            writer.write(conn.data_to_send())
            await writer.drain()
            conn.receive_data(await asyncio.wait_for(reader.read(65536), 300))
            while (event := conn.next_event()) is not NEED_DATA:
                match event:
                    case Ehlo():
                        conn.send(replies.OK)
                    case MailFrom(address=address):
                        mail_from, rcpts, chunks = address, [], []
                        conn.send(replies.SENDER_OK)
                    case RcptTo(address=address):
                        rcpts.append(address)
                        conn.send(replies.RECIPIENT_OK)
                    case DataStart():
                        conn.send(replies.START_DATA)
                    case MessageChunk(data=data):
                        chunks.append(data)
                    case EndOfData():
                        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{next(_counter):06d}.eml"
                        head = f"X-Sink-Envelope: from=<{mail_from}> to=<{'>,<'.join(rcpts)}>\r\n"
                        # Written aside, then renamed: a reader watching the folder never
                        # sees a half-written message.
                        part = folder / f".{name}.part"
                        part.write_bytes(head.encode() + b"".join(chunks))
                        part.rename(folder / name)
                        log.info("saved %s from=<%s> nrcpt=%d", name, mail_from, len(rcpts))
                        conn.send(replies.queued(name))
                    case Quit() | Close():
                        break
        writer.write(conn.data_to_send())
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()

"""SMTP server machine throughput: complete transactions through one ServerConnection, no I/O.

Owns: nothing the server uses. Measures the sans-IO hot path alone (command parsing, the DATA
reader, event dispatch), so that a regression in mailgate.smtp shows up without sockets, TLS
or the spool in the way:

    python bench/bench_smtp_parser.py --count 10000 --size 10240 --read 65536

Each transaction is MAIL, RCPT, DATA pipelined in one write, then the dot-stuffed message in
writes of `--read` bytes (as an adapter reading the socket would pass them), answered by a
minimal fake adapter. Prints one JSON object: messages per second and MiB per second.
"""

from __future__ import annotations

import argparse
import json
import time

from mailgate import replies
from mailgate.smtp.data import encode_data
from mailgate.smtp.events import SMARTHOST, DataStart, EndOfData, Event, MailFrom, RcptTo
from mailgate.smtp.server import NEED_DATA, ServerConnection

COMMANDS = b"MAIL FROM:<alice@example.org> SIZE=10240\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n"
ANSWERS: dict[type[Event], replies.Reply] = {
    MailFrom: replies.SENDER_OK,
    RcptTo: replies.RECIPIENT_OK,
    DataStart: replies.START_DATA,
    EndOfData: replies.queued("BENCH"),
}


def message(size: int) -> bytes:
    """A plausible message of about `size` octets, with some lines that need dot-stuffing."""
    head = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: bench\r\n\r\n"
    lines = [b"x" * 76 + b"\r\n", b".leading dot " + b"y" * 63 + b"\r\n"]
    body = b"".join(lines[i % 7 == 0] for i in range(max(0, size - len(head)) // 78))
    return head + body


def run(count: int, size: int, read: int) -> dict[str, float | int]:
    wire = encode_data(message(size))
    pieces = [wire[i : i + read] for i in range(0, len(wire), read)]
    conn = ServerConnection(SMARTHOST, "bench.test", max_message_size=10 * size)
    conn.start()
    conn.receive_data(b"EHLO client.test\r\n")
    assert conn.next_event() is not NEED_DATA
    conn.send(replies.OK)
    conn.data_to_send()
    answers = ANSWERS
    accepted = 0
    started = time.perf_counter()
    for _ in range(count):
        for data in (COMMANDS, *pieces):
            conn.receive_data(data)
            while (event := conn.next_event()) is not NEED_DATA:
                answer = answers.get(type(event))
                if answer is not None:  # MessageChunk needs no answer; a session would store it
                    conn.send(answer)
            accepted += conn.data_to_send().count(b" queued as BENCH")
    elapsed = time.perf_counter() - started
    assert accepted == count, f"only {accepted} of {count} messages were accepted"
    return {
        "messages": count,
        "message_octets": len(wire),
        "read_size": read,
        "seconds": round(elapsed, 4),
        "messages_per_second": round(count / elapsed, 1),
        "mib_per_second": round(count * len(wire) / elapsed / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10000, help="transactions (default 10000)")
    parser.add_argument("--size", type=int, default=10240, help="message octets (default 10240)")
    parser.add_argument("--read", type=int, default=65536, help="octets per receive_data call")
    args = parser.parse_args()
    print(json.dumps(run(args.count, args.size, args.read)))


if __name__ == "__main__":
    main()

"""DKIM signing throughput: signatures per second for RSA-2048 and Ed25519 on a 10 KiB message.

    python bench/bench_dkim.py [--seconds 2] [--size 10240]

Prints one JSON object. Each case runs `Signer.sign` (parsing, canonicalisation, hashing and
the signature; the key comes from the Signer's in-memory cache after the first call) in a loop
bounded both by time and by count. Keys are made in a temporary folder and removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from mailgate.message import dkimkeys
from mailgate.message.dkim import Signer
from mailgate.values import DkimKey, Domain

DOMAIN = "college.example.ac.uk"
MAX_ITERATIONS = 1_000_000  # a hard bound whatever --seconds says


class _Domains:
    def __init__(self, domain: Domain) -> None:
        self._domain = domain

    def get_domain(self, name: str) -> Domain | None:
        return self._domain if name == self._domain.name else None


def message(size: int) -> bytes:
    head = (
        f"From: Bursar <bursar@{DOMAIN}>\r\n"
        "To: Alice <alice@example.net>\r\n"
        "Subject: Fees for the Michaelmas term\r\n"
        "Date: Sat, 28 Nov 2026 12:00:00 +0000\r\n"
        f"Message-ID: <fees-2026@{DOMAIN}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
    ).encode()
    line = b"The fees for the Michaelmas term are due by the end of the month.   \r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head) - 2)] + b"\r\n"
    return head + body


def run(keys: tuple[DkimKey, ...], msg: bytes, seconds: float) -> dict[str, object]:
    signer = Signer(_Domains(Domain(DOMAIN, keys)))
    signer.sign(msg, DOMAIN)  # load the key(s) once, as a running server would
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while count < MAX_ITERATIONS:
        signer.sign(msg, DOMAIN)
        count += 1
        if time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - start
    return {
        "algorithms": [k.algorithm for k in keys],
        "messages": count,
        "seconds": round(elapsed, 3),
        "messages_per_second": round(count / elapsed, 1),
        "signatures_per_second": round(count * len(keys) / elapsed, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per case")
    parser.add_argument("--size", type=int, default=10240, help="message size in bytes")
    args = parser.parse_args()
    msg = message(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        rsa = dkimkeys.generate_key(base, DOMAIN, "bench", dkimkeys.ALGORITHM_RSA)
        ed = dkimkeys.generate_key(base, DOMAIN, "bench-ed", dkimkeys.ALGORITHM_ED25519)
        cases = {
            "rsa-2048": run((rsa,), msg, args.seconds),
            "ed25519": run((ed,), msg, args.seconds),
            "rsa-2048+ed25519": run((rsa, ed), msg, args.seconds),
        }
    json.dump(
        {
            "benchmark": "dkim-sign",
            "message_bytes": len(msg),
            "python": platform.python_version(),
            "dkimpy": version("dkimpy"),
            "cryptography": version("cryptography"),
            "cases": cases,
        },
        sys.stdout,
        indent=2,
    )
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

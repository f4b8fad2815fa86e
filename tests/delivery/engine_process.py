"""Run the delivery engine alone in a process, for crash tests (kill -9 from the test).

    python -m tests.delivery.engine_process SPOOL NAMESERVER [PER_DESTINATION [no-recover]]

Prints "running" once the engine has started; runs until SIGTERM (graceful) or SIGKILL.
"no-recover" skips `recover()` (which takes the journal's exclusive lock), for a test that
holds the shared lock to keep the engine from writing.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from mailgate.config import Config, DeliveryConfig, SpoolConfig
from mailgate.deliver.engine import Engine
from mailgate.spool.journal import JournalStore


async def main(spool: Path, nameserver: str, per_destination: int, recover: bool) -> None:
    host, _, port = nameserver.rpartition(":")
    cfg = Config(
        path=spool.parent / "mailgate.toml",
        hostname="mail.example.org",
        spool=SpoolConfig(spool),
        delivery=DeliveryConfig(
            nameservers=((host, int(port)),),
            smtp_port=25,
            retry_schedule=(60,),
            connect_timeout=3.0,
            command_timeout=30.0,
            max_per_destination=per_destination,
        ),
    )
    store = JournalStore(spool)
    if recover:
        store.recover()
    engine = Engine(cfg, store)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    task = asyncio.get_running_loop().create_task(engine.run())
    print("running", flush=True)
    await stop.wait()
    await engine.stop()
    await task


if __name__ == "__main__":
    per_destination = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    recover = sys.argv[4] != "no-recover" if len(sys.argv) > 4 else True
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], per_destination, recover))

"""Channel read deadlines (receive/channel.py), without sockets: one timer per connection that
fires early when a later deadline was asked for meanwhile, and then waits for that one."""

from __future__ import annotations

import asyncio

import pytest

from mailgate.receive.channel import Channel


class FakeTransport:
    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


async def a_channel() -> Channel:
    channel = Channel(lambda ch: None)
    channel.connection_made(FakeTransport())  # type: ignore[arg-type]
    return channel


def test_a_later_deadline_outlives_the_timer_set_for_an_earlier_one() -> None:
    async def main() -> tuple[bytes, float, float]:
        loop = asyncio.get_running_loop()
        channel = await a_channel()
        began = loop.time()
        loop.call_later(0.1, channel.data_received, b"EHLO x\r\n")
        first = await channel.read(began + 0.3)  # arms the timer for began + 0.3
        second_deadline = loop.time() + 0.5  # later than the armed timer
        with pytest.raises(TimeoutError):
            await channel.read(second_deadline)
        return first, loop.time() - began, second_deadline - began

    first, timed_out_at, expected = asyncio.run(main())
    assert first == b"EHLO x\r\n"
    assert timed_out_at >= expected - 0.01, (timed_out_at, expected)  # not at the old 0.3


def test_a_passed_deadline_times_out_even_with_bytes_buffered() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        channel = await a_channel()
        channel.data_received(b"M")  # a byte that completes nothing buys no time
        with pytest.raises(TimeoutError):
            await channel.read(loop.time() - 0.001)
        assert await channel.read(loop.time() + 1) == b"M"

    asyncio.run(main())

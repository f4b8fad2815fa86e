"""Channel read deadlines (receive/channel.py), without sockets: one timer per connection that
fires early when a later deadline was asked for meanwhile, and then waits for that one."""

from __future__ import annotations

import asyncio

import pytest

from mailgate.receive.channel import Channel, ProxyPolicy
from mailgate.receive.proxy import build_v1, build_v2
from tests.support.waiting import wait_for_async


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


# --- PROXY protocol --------------------------------------------------------------------


class PeerTransport(FakeTransport):
    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.peer if name == "peername" else default


def proxied(peer: tuple[str, int], timeout: float = 10.0
            ) -> tuple[Channel, list[Channel], list[str]]:  # fmt: skip
    connected: list[Channel] = []
    refused: list[str] = []
    policy = ProxyPolicy(lambda ip: ip == "10.0.0.5",
                         lambda ch, why: refused.append(why), timeout)  # fmt: skip
    channel = Channel(connected.append, policy)
    channel.connection_made(PeerTransport(peer))  # type: ignore[arg-type]
    return channel, connected, refused


def test_a_balancer_header_names_the_client_before_the_session_starts() -> None:
    async def main() -> None:
        channel, connected, refused = proxied(("10.0.0.5", 40000))
        header = build_v2(("192.0.2.7", 51234), ("198.51.100.1", 587))
        channel.data_received(header[:10])  # split anywhere: nothing happens yet
        assert connected == []
        channel.data_received(header[10:] + b"EHLO x\r\n")
        assert connected == [channel] and refused == []
        assert channel.get_extra_info("peername") == ("192.0.2.7", 51234)
        assert await channel.read() == b"EHLO x\r\n"  # what followed the header

    asyncio.run(main())


def test_a_balancer_without_a_header_is_refused() -> None:
    async def main() -> None:
        channel, connected, refused = proxied(("10.0.0.5", 40000))
        channel.data_received(b"EHLO x\r\n")
        assert connected == [] and refused == ["bad PROXY header: no PROXY header"]
        channel, connected, refused = proxied(("10.0.0.5", 40000), timeout=0.01)
        await wait_for_async(lambda: refused, timeout=5.0)  # the header timer fires
        assert connected == [] and refused == ["no PROXY header in time"]

    asyncio.run(main())


def test_a_header_from_anybody_else_is_refused_and_never_believed() -> None:
    async def main() -> None:
        channel, connected, refused = proxied(("192.0.2.99", 40000))
        assert connected == [channel]  # an ordinary client: served at once
        channel.data_received(build_v1(("10.1.2.3", 1), ("198.51.100.1", 25)))
        assert refused == ["PROXY header from a peer outside proxy_networks"]
        assert channel.get_extra_info("peername") == ("192.0.2.99", 40000)
        assert await channel.read() == b""  # the session sees the end, never the header

    asyncio.run(main())


# --- the session's direct path ---------------------------------------------------------


def test_bytes_go_to_the_direct_callback_while_a_read_waits_until_it_hands_over() -> None:
    async def main() -> tuple[list[bytes], bytes, bytes]:
        loop = asyncio.get_running_loop()
        channel = await a_channel()
        given: list[bytes] = []

        def direct(data: bytes) -> bool:
            given.append(data)
            return data != b"DATA\r\n"  # False: wake the reader

        channel.direct = direct
        channel.data_received(b"early\r\n")  # no read waits yet: buffered
        assert await channel.read(loop.time() + 5) == b"early\r\n"
        reading = asyncio.ensure_future(channel.read(loop.time() + 5))
        await wait_for_async(lambda: channel._waiter is not None, what="the read to wait")
        channel.data_received(b"MAIL FROM:<a@b>\r\n")  # handled by the callback
        assert not reading.done()
        channel.data_received(b"DATA\r\n")  # handed over: the read ends
        channel.data_received(b"late\r\n")  # the reader owns the session now: buffered
        woken = await reading
        channel.data_received(b"QUIT\r\n")  # no read waits: buffered
        return given, woken, await channel.read(loop.time() + 5)

    given, woken, after = asyncio.run(main())
    assert given == [b"MAIL FROM:<a@b>\r\n", b"DATA\r\n"]
    assert woken == b"late\r\n"  # only what came after the hand-over
    assert after == b"QUIT\r\n"


class FlowTransport(FakeTransport):
    """Records pause_reading()/resume_reading() in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")


def test_the_direct_path_lets_the_loop_turn_after_64_kib_and_then_reads_again() -> None:
    # Without the pause a client streaming DATA keeps the loop in one turn for as much as the
    # transport reads in a row, and every other session's reply waits for it.
    async def main() -> tuple[list[str], list[str], int]:
        loop = asyncio.get_running_loop()
        channel = Channel(lambda ch: None)
        transport = FlowTransport()
        channel.connection_made(transport)  # type: ignore[arg-type]
        given: list[bytes] = []

        def direct(data: bytes) -> bool:
            given.append(data)
            return True  # handled

        channel.direct = direct
        reading = asyncio.ensure_future(channel.read(loop.time() + 5))
        await wait_for_async(lambda: channel._waiter is not None, what="the read to wait")
        channel.data_received(b"x" * 32 * 1024)
        channel.data_received(b"x" * 32 * 1024)  # 64 KiB handled in this turn: pause
        before_turn = list(transport.calls)
        await wait_for_async(lambda: transport.calls == ["pause", "resume"],
                             what="reading to resume")  # fmt: skip
        channel.data_received(b"x" * 32 * 1024)  # a new turn: counted from zero
        after = list(transport.calls)
        reading.cancel()
        return before_turn, after, sum(map(len, given))

    before_turn, after, handled = asyncio.run(main())
    assert before_turn == ["pause"]
    assert after == ["pause", "resume"]
    assert handled == 96 * 1024

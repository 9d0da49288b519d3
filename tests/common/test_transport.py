"""The ZeroMQ helpers over real sockets in-process: the loop-driven channel (frames read as
they come, sends from any thread, bursts, a closed socket), identities handed over, tolerant
decoding, and which endpoints count as loopback."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

import pytest
import zmq

from vdiff_common import protocol, transport
from vdiff_common.protocol import Abort, Heartbeat


@pytest.mark.parametrize(
    "address,loopback",
    [
        ("tcp://127.0.0.1:5557", True),
        ("tcp://127.3.2.1:5557", True),
        ("tcp://localhost:5557", True),
        ("tcp://[::1]:5557", True),
        ("ipc:///tmp/vdiff.sock", True),
        ("inproc://gateway", True),
        ("tcp://0.0.0.0:5557", False),
        ("tcp://*:5557", False),
        ("tcp://10.0.0.7:5557", False),
        ("tcp://gateway.vdiff.svc:5557", False),
        ("tcp://eth0:5557", False),
    ],
)
def test_loopback_endpoints(address: str, loopback: bool) -> None:
    assert transport.is_loopback(address) is loopback


def test_undecodable_frames_are_counted_and_logged_once_per_peer() -> None:
    seen: list[int] = []
    counter = transport.FrameCounter(lambda: seen.append(1))
    good = protocol.encode(Abort(request_id="r1"))
    assert transport.try_decode(good, b"w", counter, protocol.decode_for_worker) == Abort("r1")
    for frame in (b"\xff\x00", b"{}", protocol.encode(Heartbeat(sender_id="g")) + b"x"):
        assert transport.try_decode(frame, b"w", counter, protocol.decode_for_worker) is None
    assert counter.rejected == 3 and len(seen) == 3
    assert counter._seen_peers == {b"w"}


def test_a_frame_for_the_other_direction_is_refused() -> None:
    counter = transport.FrameCounter()
    to_worker = protocol.encode(Abort(request_id="r1"))
    assert transport.try_decode(to_worker, b"g", counter, protocol.decode_for_gateway) is None
    assert counter.rejected == 1


class Link:
    """A gateway's channel on a real ROUTER and one worker's DEALER, in this process."""

    def __init__(self) -> None:
        self.ctx = transport.make_context()
        self.got: list[list[bytes]] = []  # [identity, frame] as the channel received them
        self.chan = transport.Channel(
            transport.router(self.ctx, "inproc://gateway"),
            asyncio.get_running_loop(),
            self.got.append,
        )
        self.dealers = [self.dealer()]

    def dealer(self) -> zmq.Socket[bytes]:
        return transport.dealer(self.ctx, "inproc://gateway", b"worker-1")

    async def received(self, n: int) -> list[bytes]:
        """The frames, once ``n`` have arrived."""
        for _ in range(1000):
            if len(self.got) >= n:
                return [f for _, f in self.got]
            await asyncio.sleep(0.01)
        raise AssertionError(f"{len(self.got)} of {n} frames arrived")

    def close(self) -> None:
        self.chan.close()
        for d in self.dealers:
            d.close(0)
        self.ctx.term()


def run(test: Callable[[Link], Awaitable[None]]) -> None:
    async def main() -> None:
        link = Link()
        try:
            await test(link)
        finally:
            link.close()

    asyncio.run(main())


def test_the_channel_reads_bursts_and_sends_from_any_thread() -> None:
    async def test(link: Link) -> None:
        n = transport.Channel.BURST * 2 + 5  # more than one wake-up's worth
        for i in range(n):
            link.dealers[0].send(str(i).encode())
        assert await link.received(n) == [str(i).encode() for i in range(n)]
        assert {ident for ident, _ in link.got} == {b"worker-1"}
        # A thread that is not the loop's sends (as a worker's engine does).
        sent: list[bool] = []
        t = threading.Thread(target=lambda: sent.append(link.chan.send([b"worker-1", b"hi"])))
        t.start()
        t.join()
        assert sent == [True]
        assert await asyncio.to_thread(link.dealers[0].recv) == b"hi"
        link.chan.close()
        assert link.chan.send([b"worker-1", b"late"]) is False  # closed: refused, not raised

    run(test)


def test_a_send_that_swallows_the_readable_signal_still_drains() -> None:
    # The socket's fd is edge-triggered: frames that arrive while the loop sends must still
    # be read, without waiting for another frame to wake the reader.
    async def test(link: Link) -> None:
        dealer = link.dealers[0]
        dealer.send(b"a")
        await link.received(1)
        dealer.send(b"b")
        dealer.send(b"c")
        assert link.chan.send([b"worker-1", b"x"])
        assert await link.received(3) == [b"a", b"b", b"c"]

    run(test)


def test_a_restarted_worker_takes_over_its_identity() -> None:
    async def test(link: Link) -> None:
        link.dealers[0].send(b"one")
        await link.received(1)
        link.dealers.append(second := link.dealer())
        second.send(b"two")
        assert await link.received(2) == [b"one", b"two"]
        assert link.chan.send([b"worker-1", b"to the new one"])
        assert await asyncio.to_thread(second.recv) == b"to the new one"

    run(test)

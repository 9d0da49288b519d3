"""The ZeroMQ helpers over real sockets in-process: the loop-driven channel (frames read as
they come, sends from any thread, bursts, a closed socket), identities handed over, tolerant
decoding, and which endpoints count as loopback."""

from __future__ import annotations

import asyncio
import threading

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


async def _pair(
    got: list[list[bytes]], arrived: asyncio.Event, want: int
) -> tuple[zmq.Context[zmq.Socket[bytes]], transport.Channel, zmq.Socket[bytes]]:
    ctx = transport.make_context()
    sock = transport.router(ctx, "inproc://gateway")

    def on_frames(frames: list[bytes]) -> None:
        got.append(frames)
        if len(got) >= want:
            arrived.set()

    chan = transport.Channel(sock, asyncio.get_running_loop(), on_frames)
    return ctx, chan, transport.dealer(ctx, "inproc://gateway", b"worker-1")


def test_the_channel_reads_bursts_and_sends_from_any_thread() -> None:
    async def main() -> None:
        n = transport.Channel.BURST * 2 + 5  # more than one wake-up's worth
        got: list[list[bytes]] = []
        arrived = asyncio.Event()
        ctx, chan, dealer = await _pair(got, arrived, n)
        for i in range(n):
            dealer.send(str(i).encode())
        await asyncio.wait_for(arrived.wait(), 10)
        assert [f for _, f in got] == [str(i).encode() for i in range(n)]
        assert {ident for ident, _ in got} == {b"worker-1"}
        # A thread that is not the loop's sends (as a worker's engine does).
        sent: list[bool] = []
        t = threading.Thread(target=lambda: sent.append(chan.send([b"worker-1", b"hello"])))
        t.start()
        t.join()
        assert sent == [True]
        assert await asyncio.to_thread(dealer.recv) == b"hello"
        chan.close()
        assert chan.send([b"worker-1", b"late"]) is False  # closed: refused, not raised
        dealer.close(0)
        ctx.term()

    asyncio.run(main())


def test_a_send_that_swallows_the_readable_signal_still_drains() -> None:
    # The socket's fd is edge-triggered: frames that arrive while the loop sends must still
    # be read, without waiting for another frame to wake the reader.
    async def main() -> None:
        got: list[list[bytes]] = []
        arrived = asyncio.Event()
        ctx, chan, dealer = await _pair(got, arrived, 3)
        dealer.send(b"a")
        await asyncio.sleep(0.05)
        dealer.send(b"b")
        dealer.send(b"c")
        assert chan.send([b"worker-1", b"x"])
        await asyncio.wait_for(arrived.wait(), 10)
        assert [f for _, f in got] == [b"a", b"b", b"c"]
        chan.close()
        dealer.close(0)
        ctx.term()

    asyncio.run(main())


def test_a_restarted_worker_takes_over_its_identity() -> None:
    async def main() -> None:
        got: list[list[bytes]] = []
        arrived = asyncio.Event()
        ctx, chan, first = await _pair(got, arrived, 2)
        first.send(b"one")
        await asyncio.sleep(0.05)
        second = transport.dealer(ctx, "inproc://gateway", b"worker-1")
        second.send(b"two")
        await asyncio.wait_for(arrived.wait(), 10)
        assert chan.send([b"worker-1", b"to the new one"])
        assert await asyncio.to_thread(second.recv) == b"to the new one"
        chan.close()
        for s in (first, second):
            s.close(0)
        ctx.term()

    asyncio.run(main())

"""ZeroMQ helpers: sockets with sane options, a loop-driven channel, tolerant decoding."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from collections.abc import Callable
from typing import TypeVar, cast
from urllib.parse import urlsplit

import msgspec
import zmq
from loguru import logger

from vdiff_common.curve import Keys

M = TypeVar("M")


class FrameCounter:
    """Counts undecodable frames; logs the first one per peer."""

    def __init__(self, on_reject: Callable[[], None] | None = None) -> None:
        self.rejected = 0
        self._seen_peers: set[bytes] = set()
        self._on_reject = on_reject

    def reject(self, peer: bytes, err: Exception) -> None:
        self.rejected += 1
        if self._on_reject is not None:
            self._on_reject()
        if peer not in self._seen_peers:
            self._seen_peers.add(peer)
            logger.warning("dropping undecodable frame from peer {!r}: {}", peer[:32], err)


def try_decode(
    frame: bytes, peer: bytes, counter: FrameCounter, decode: Callable[[bytes], M]
) -> M | None:
    """`decode` is the receiver's own (protocol.decode_for_gateway or _for_worker)."""
    try:
        return decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as err:
        counter.reject(peer, err)
        return None


def make_context() -> zmq.Context[zmq.Socket[bytes]]:
    return zmq.Context()


class Channel:
    """A ZeroMQ socket driven by an asyncio loop, without a future per message: frames are
    read as soon as the socket's file descriptor fires, and any thread may send (a worker's
    engine thread sends its results itself instead of waking the loop to do it).

    libzmq sockets are not thread-safe, so every use of the socket holds the lock.
    """

    BURST = 256  # frames read per wake-up before other callbacks get a turn

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        loop: asyncio.AbstractEventLoop,
        on_frames: Callable[[list[bytes]], None],
    ) -> None:
        self.sock = sock
        self.loop = loop
        self.on_frames = on_frames
        self._lock = threading.Lock()
        self._loop_thread = threading.get_ident()
        self._fd = sock.FD
        loop.add_reader(self._fd, self._drain)
        loop.call_soon(self._drain)  # what arrived before the reader was added

    def _drain(self) -> None:
        for _ in range(self.BURST):
            with self._lock:
                if self.sock.closed:
                    return
                try:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    return
            self.on_frames(frames)
        self.loop.call_soon(self._drain)

    def send(self, frames: list[bytes]) -> bool:
        """Queue a message without blocking; False when the socket refused or is closed."""
        with self._lock:
            if self.sock.closed:
                return False
            try:
                self.sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.ZMQError as err:
                logger.debug("zmq send failed: {}", err)
                return False
            # The fd is edge-like: a send may consume the signal of frames that arrived.
            readable = bool(cast(int, self.sock.get(zmq.EVENTS)) & zmq.POLLIN)
        if readable:
            if threading.get_ident() == self._loop_thread:
                self.loop.call_soon(self._drain)
            else:
                self.loop.call_soon_threadsafe(self._drain)
        return True

    def close(self) -> None:
        self.loop.remove_reader(self._fd)
        with self._lock:
            self.sock.close(0)


def is_loopback(address: str) -> bool:
    """Whether a ZeroMQ endpoint is reachable from this host only (ipc, inproc, loopback)."""
    parts = urlsplit(address)
    if parts.scheme != "tcp":
        return parts.scheme in ("ipc", "inproc")
    host = parts.netloc.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface or a host name


def router(
    ctx: zmq.Context[zmq.Socket[bytes]],
    bind: str,
    curve: Keys | None = None,
) -> zmq.Socket[bytes]:
    """The gateway's socket; with `curve` a CURVE server (ZAP decides who may connect)."""
    sock = ctx.socket(zmq.ROUTER)
    if curve is not None:
        sock.curve_secretkey = curve.secret
        sock.curve_publickey = curve.public
        sock.curve_server = True
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker reuses its identity
    sock.setsockopt(zmq.MAXMSGSIZE, 64 * 1024 * 1024)
    sock.bind(bind)
    return sock


def dealer(
    ctx: zmq.Context[zmq.Socket[bytes]], connect: str, identity: bytes, curve: Keys | None = None
) -> zmq.Socket[bytes]:
    """A worker's socket to one gateway; with `curve` a CURVE client of that gateway."""
    sock = ctx.socket(zmq.DEALER)
    if curve is not None:
        assert curve.server is not None
        sock.curve_secretkey = curve.secret
        sock.curve_publickey = curve.public
        sock.curve_serverkey = curve.server
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.MAXMSGSIZE, 64 * 1024 * 1024)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    sock.connect(connect)
    return sock

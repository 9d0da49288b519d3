"""ZeroMQ helpers: sockets with sane options and a receive loop that never dies on bad frames."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from urllib.parse import urlsplit

import msgspec
import zmq
import zmq.asyncio
from loguru import logger

from vdiff_common import protocol
from vdiff_common.curve import Keys


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


def try_decode(frame: bytes, peer: bytes, counter: FrameCounter) -> protocol.Message | None:
    try:
        return protocol.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as err:
        counter.reject(peer, err)
        return None


def make_context() -> zmq.asyncio.Context:
    return zmq.asyncio.Context()


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


def router(ctx: zmq.asyncio.Context, bind: str, curve: Keys | None = None,
           ) -> zmq.asyncio.Socket:
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


def dealer(ctx: zmq.asyncio.Context, connect: str, identity: bytes,
           curve: Keys | None = None) -> zmq.asyncio.Socket:
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

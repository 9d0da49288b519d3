"""The worker's network side: DEALER sockets to every gateway, handshake, heartbeats, drain."""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from loguru import logger

from vdiff_common import protocol, transport
from vdiff_common.curve import Keys
from vdiff_common.protocol import (
    Abort,
    Chunk,
    Done,
    Error,
    Generate,
    Heartbeat,
    ModelInfo,
    Register,
    Tokenize,
    Tokens,
    Welcome,
)
from vdiff_worker.engine import Engine


@dataclass
class Link:
    """One connected gateway address."""

    address: str
    chan: transport.Channel
    registered: bool = False
    last_heard: float = field(default_factory=time.monotonic)


def resolve(address: str) -> list[str]:
    """A tcp:// address with a DNS name stands for every address it resolves to."""
    parts = urlsplit(address)
    if parts.scheme != "tcp" or parts.hostname is None:
        return [address]
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        logger.warning("cannot resolve gateway {}: {}", address, err)
        return []
    hosts = sorted({str(i[4][0]) for i in infos})
    return [f"tcp://[{h}]:{parts.port}" if ":" in h else f"tcp://{h}:{parts.port}" for h in hosts]


class WorkerService:
    def __init__(
        self,
        engine: Engine,
        gateways: list[str],
        worker_id: str,
        model: ModelInfo,
        heartbeat_s: float = 1.0,
        resolve_s: float = 10.0,
        curve: Keys | None = None,
    ) -> None:
        self.engine = engine
        self.curve = curve  # CURVE client keys for every gateway link
        self.gateways = gateways
        self.worker_id = worker_id
        self.model = model
        self.heartbeat_s = heartbeat_s
        self.resolve_s = resolve_s
        self.ctx = transport.make_context()
        self.links: dict[str, Link] = {}
        self.frames = transport.FrameCounter()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._by_index: list[Link] = []
        # request id -> (the link its job came on, choices not yet done)
        self._owners: dict[str, tuple[Link, int]] = {}

    # ---- engine callback (engine thread) ------------------------------------------------
    def emit(self, msg: protocol.Message) -> None:
        """Sent from the engine thread itself: a result does not wait for the event loop.
        The engine addresses results by request id; the link they go back on is known here."""
        if not isinstance(msg, (Chunk, Done, Error)):
            return  # the engine emits only results
        rid = msg.request_id
        owner = self._owners.get(rid)
        if owner is None:
            return
        link, left = owner
        if isinstance(msg, Error) or (isinstance(msg, Done) and left <= 1):
            self._owners.pop(rid, None)
        elif isinstance(msg, Done):
            self._owners[rid] = (link, left - 1)
        self._send(link, msg)

    def _send(self, link: Link, msg: protocol.ToGateway) -> None:
        if not link.chan.send([protocol.encode(msg)]):
            logger.debug("send to {} failed", link.address)

    # ---- lifecycle -------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event, drain_timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self._refresh_links()
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self._resolve_loop()),
        ]
        await stop.wait()
        await self.drain(drain_timeout)

    async def drain(self, timeout: float) -> None:
        logger.info("worker {} draining", self.worker_id)
        self.engine.accepting = False
        for link in self.links.values():
            self._send(link, protocol.Goodbye(sender_id=self.worker_id))
        deadline = time.monotonic() + timeout
        while not self.engine.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)  # let the last results leave the sockets
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for link in self.links.values():
            link.chan.close()
        self.ctx.term()

    def _refresh_links(self) -> None:
        wanted = [a for g in self.gateways for a in resolve(g)]
        for address in wanted:
            if address not in self.links:
                assert self.loop is not None
                sock = transport.dealer(self.ctx, address, self.worker_id.encode(), self.curve)
                index = len(self._by_index)
                chan = transport.Channel(sock, self.loop, functools.partial(self._on_frames, index))
                link = Link(address=address, chan=chan)
                self.links[address] = link
                self._by_index.append(link)
                self._register(link)
                logger.info("worker {} connecting to gateway {}", self.worker_id, address)

    def _register(self, link: Link) -> None:
        self._send(
            link,
            Register(
                version=protocol.PROTOCOL_VERSION,
                worker_id=self.worker_id,
                models=[self.model],
                capacity=self.engine.max_num_seqs + self.engine.max_queue_size,
                load=self.engine.load(),
            ),
        )

    # ---- receiving and loops -----------------------------------------------------------------
    def _on_frames(self, index: int, frames: list[bytes]) -> None:
        link = self._by_index[index]
        for payload in frames:  # a gateway sends one frame per message
            self._on_message(index, link, payload)

    def _on_message(self, index: int, link: Link, payload: bytes) -> None:
        msg = transport.try_decode(
            payload, link.address.encode(), self.frames, protocol.decode_for_worker
        )
        if msg is None:
            return
        link.last_heard = time.monotonic()
        if isinstance(msg, Generate):
            self._owners[msg.request_id] = (link, msg.n)
            self.engine.submit(msg)
        elif isinstance(msg, Abort):
            self._owners.pop(msg.request_id, None)
            self.engine.abort(msg.request_id)
        elif isinstance(msg, Tokenize):
            self._send(link, self._tokenize(msg))
        elif isinstance(msg, Welcome):
            self._welcome(link, msg)
        # A Heartbeat only says the gateway is there: last_heard above.

    def _tokenize(self, msg: Tokenize) -> Tokens | Error:
        """Answered here, in the network thread: the tokenizer alone is cheap."""
        tok = self.engine.loaded.tokenizer
        rid = msg.request_id
        try:
            if msg.tokens is not None:
                bad = [t for t in msg.tokens if not 0 <= t < tok.vocab_size]
                if bad:
                    return Error(
                        rid,
                        400,
                        f"token id {bad[0]} is outside the vocabulary (size {tok.vocab_size})",
                        "tokens",
                    )
                return Tokens(rid, text=tok.decode(msg.tokens, skip_special_tokens=False))
            if msg.messages is not None:
                return Tokens(rid, tokens=tok.apply_chat_template(msg.messages))
            return Tokens(rid, tokens=tok.encode(msg.prompt or ""))
        except Exception as err:  # noqa: BLE001 - a bad prompt or template must not end the loop
            return Error(
                rid,
                400,
                f"cannot tokenize: {err}",
                "messages" if msg.messages is not None else "prompt",
            )

    def _welcome(self, link: Link, msg: Welcome) -> None:
        if msg.accepted:
            link.registered = True
            logger.info("registered with gateway {} ({})", msg.gateway_id, link.address)
        elif msg.reason == "unregistered":
            link.registered = False
            self._register(link)  # the gateway restarted and forgot us
        else:
            logger.error("gateway {} refused registration: {}", link.address, msg.reason)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            now = time.monotonic()
            for link in self.links.values():
                if not link.registered or now - link.last_heard > 3 * self.heartbeat_s:
                    link.registered = False
                    self._register(link)
                else:
                    self._send(link, Heartbeat(sender_id=self.worker_id, load=self.engine.load()))

    async def _resolve_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resolve_s)
            self._refresh_links()

"""Tracks workers over one ROUTER socket and routes jobs to them and their results back."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import zmq
import zmq.auth
from loguru import logger
from zmq.auth.asyncio import AsyncioAuthenticator

from vdiff_api import metrics
from vdiff_api.backend import NoWorker, Result, Snapshot, Trace, WorkerState
from vdiff_common import protocol, transport
from vdiff_common.curve import Keys
from vdiff_common.protocol import (
    Abort,
    Chunk,
    Done,
    Error,
    Generate,
    Load,
    ModelInfo,
    Tokenize,
    Tokens,
)


@dataclass
class Worker:
    identity: bytes
    worker_id: str
    models: dict[str, ModelInfo]
    capacity: int
    load: Load
    last_seen: float
    inflight: set[str] = field(default_factory=set)
    draining: bool = False

    def score(self) -> int:
        # Heartbeat load lags; our own in-flight count is exact for what we sent.
        return max(self.load.running + self.load.waiting, len(self.inflight))


@dataclass
class Job:
    msg: Generate
    deliver: Callable[[Result], None]  # called on the event loop with each result
    trace: Trace
    worker: bytes | None = None
    started: bool = False
    retried: bool = False
    open_choices: int = 1


class AuthorizedKeys:
    """ZAP credentials check: a worker's public key must be in the authorized directory,
    re-read on a miss (a key added there is admitted without a restart)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.keys = self._read()
        self.refused: set[bytes] = set()

    def _read(self) -> set[bytes]:
        return set(zmq.auth.load_certificates(self.directory))

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        self.keys = self._read()
        if key in self.keys:
            return True
        if key not in self.refused:
            self.refused.add(key)
            logger.warning(
                "refused a worker whose CURVE public key {} is not in {}",
                key.decode(),
                self.directory,
            )
        return False


class Dispatcher:
    """The Backend over ZeroMQ: workers register, heartbeat and answer on one ROUTER."""

    def __init__(
        self, bind: str, heartbeat_s: float = 1.0, curve: tuple[Keys, Path] | None = None
    ) -> None:
        self.bind = bind
        self.heartbeat_s = heartbeat_s
        self.curve = curve  # our keypair and the directory of admitted worker keys
        self.gateway_id = f"gw-{uuid.uuid4().hex[:8]}"
        self.workers: dict[bytes, Worker] = {}
        self.jobs: dict[str, Job] = {}
        self.calls: dict[str, tuple[bytes, asyncio.Future[Tokens | Error]]] = {}  # one-shots
        self.seen_models: set[str] = set()
        self.frames = transport.FrameCounter(metrics.REJECTED_FRAMES.inc)
        self._ctx = transport.make_context()
        self._chan: transport.Channel | None = None
        self._auth: AsyncioAuthenticator | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        keys = None
        if self.curve is not None:
            keys, authorized = self.curve
            self._auth = AsyncioAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve_callback("*", AuthorizedKeys(authorized))
        elif not transport.is_loopback(self.bind):
            logger.warning(
                "the worker socket {} is reachable from other hosts without CURVE: "
                "anyone who connects can register as a worker and receive "
                "prompts; use --zmq-curve-dir",
                self.bind,
            )
        sock = transport.router(self._ctx, self.bind, keys)
        self._chan = transport.Channel(sock, asyncio.get_running_loop(), self._on_frames)
        self._tasks = [asyncio.create_task(self._heartbeat_loop())]
        logger.info(
            "gateway {} listening for workers on {}{}",
            self.gateway_id,
            self.bind,
            " (CURVE)" if keys is not None else "",
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._chan is not None:
            self._chan.close()
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    # ---- routing -------------------------------------------------------------------------
    def routable(self, w: Worker) -> bool:
        """Not draining, and heard from within 3 heartbeats (the heartbeat loop drops a
        silent worker on its next tick; routing and readiness do not wait for that)."""
        return not w.draining and time.monotonic() - w.last_seen <= 3 * self.heartbeat_s

    def models(self) -> dict[str, ModelInfo]:
        """The models some routable worker serves."""
        out: dict[str, ModelInfo] = {}
        for w in self.workers.values():
            if self.routable(w):
                out.update(w.models)
        return out

    def resolve(self, model: str | None) -> ModelInfo:
        """The served model a request names (None: the only one served); raises NoWorker
        with the status to answer. The one place these rules live."""
        served = self.models()
        if not served:
            # A gateway with no live worker (just started, or its workers are gone) cannot
            # tell a model that does not exist from one whose workers have not arrived yet.
            raise NoWorker(503, "no worker is registered yet; retry shortly")
        if model is None:
            if len(served) == 1:
                return next(iter(served.values()))
            raise NoWorker(400, "'model' is required")
        if model in served:
            return served[model]
        if model in self.seen_models:
            raise NoWorker(503, f"no worker serving model '{model}' is available")
        raise NoWorker(404, f"The model '{model}' does not exist.")

    def snapshot(self) -> Snapshot:
        workers = [
            WorkerState(
                id=w.worker_id,
                models=sorted(w.models),
                draining=w.draining,
                capacity=w.capacity,
                inflight=len(w.inflight),
                load=w.load,
            )
            for w in self.workers.values()
        ]
        return Snapshot(models=self.models(), workers=workers)

    def _live(self, model: str, exclude: bytes | None = None) -> list[Worker]:
        self.resolve(model)  # its 404/503 refusals, the same the gateway gave
        live = [
            w
            for w in self.workers.values()
            if model in w.models and self.routable(w) and w.identity != exclude
        ]
        if not live:  # only the excluded worker serves it
            raise NoWorker(503, f"no worker serving model '{model}' is available")
        return live

    def _pick(self, model: str, exclude: bytes | None = None) -> Worker:
        live = self._live(model, exclude)
        free = [w for w in live if len(w.inflight) < w.capacity]
        if not free:
            raise NoWorker(429, f"every worker serving '{model}' is at capacity; retry later")
        return min(free, key=Worker.score)

    @staticmethod
    def _unique(request_id: str, inflight: Mapping[str, object]) -> str:
        """Clients may reuse an x-request-id while the first is in flight; keep both apart."""
        while request_id in inflight:
            request_id = f"{request_id}.{uuid.uuid4().hex[:6]}"
        return request_id

    def dispatch(
        self,
        msg: Generate,
        trace: Trace,
        deliver: Callable[[Result], None],
    ) -> str:
        """Send a job (raises NoWorker when none can take it); `deliver` gets its results,
        straight from the socket, until every choice is Done or an Error ends it. Returns
        the job's id for `abort`."""
        worker = self._pick(msg.model)
        msg = msgspec.structs.replace(msg, request_id=self._unique(msg.request_id, self.jobs))
        job = Job(msg=msg, deliver=deliver, trace=trace, open_choices=msg.n)
        self.jobs[msg.request_id] = job
        self._send_job(job, worker)
        return msg.request_id

    def abort(self, request_id: str) -> None:
        """The caller stops listening: a job still running is aborted on its worker."""
        self._end(request_id, abort=True)

    async def call(self, msg: Tokenize, trace: Trace) -> Tokens | Error:
        """A one-shot request: the least-loaded live worker serving the model answers it
        (from its network thread, so a full engine does not matter)."""
        worker = min(self._live(msg.model), key=Worker.score)
        trace.workers.add(worker.worker_id)
        reply: asyncio.Future[Tokens | Error] = asyncio.get_running_loop().create_future()
        msg = msgspec.structs.replace(msg, request_id=self._unique(msg.request_id, self.calls))
        self.calls[msg.request_id] = (worker.identity, reply)
        try:
            self._send(worker.identity, msg)
            return await reply
        finally:
            self.calls.pop(msg.request_id, None)

    def _send_job(self, job: Job, worker: Worker) -> None:
        job.worker = worker.identity
        worker.inflight.add(job.msg.request_id)
        job.trace.workers.add(worker.worker_id)
        # Stamped before the send: stamped after it, a gateway descheduled in between could
        # see the worker's time exceed the flight it is part of.
        if job.trace.sent is None:
            job.trace.sent = time.perf_counter()
        self._send(worker.identity, job.msg)

    def _end(self, request_id: str, abort: bool) -> None:
        job = self.jobs.pop(request_id, None)
        if job is None or job.worker is None:
            return
        worker = self.workers.get(job.worker)
        if worker is not None:
            worker.inflight.discard(request_id)
            if abort:
                self._send(worker.identity, Abort(request_id=request_id))

    def _send(self, identity: bytes, msg: protocol.ToWorker) -> None:
        assert self._chan is not None
        if not self._chan.send([identity, protocol.encode(msg)]):
            logger.warning("send to {!r} failed", identity)

    # ---- receiving -----------------------------------------------------------------------
    def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.frames.reject(frames[0] if frames else b"?", ValueError("bad frame count"))
            return
        identity, payload = frames
        msg = transport.try_decode(payload, identity, self.frames, protocol.decode_for_gateway)
        if msg is not None:
            self._handle(identity, msg)

    def _handle(self, identity: bytes, msg: protocol.ToGateway) -> None:
        worker = self.workers.get(identity)
        if worker is not None:
            worker.last_seen = time.monotonic()
        if isinstance(msg, protocol.Register):
            self._register(identity, msg)
        elif isinstance(msg, protocol.Heartbeat):
            if worker is None:
                self._send(identity, protocol.Welcome(self.gateway_id, False, "unregistered"))
            else:
                worker.load = msg.load
        elif isinstance(msg, Tokens) or (isinstance(msg, Error) and msg.request_id in self.calls):
            call = self.calls.get(msg.request_id)
            if call is not None and call[0] == identity and not call[1].done():
                call[1].set_result(msg)
        elif isinstance(msg, (Chunk, Done, Error)):
            job = self.jobs.get(msg.request_id)
            if job is None:
                return
            if isinstance(msg, Error) and msg.status in (429, 503) and job.worker == identity:
                # Draining or full: the job never ran there, so another worker may take it.
                if worker is not None:
                    worker.inflight.discard(msg.request_id)
                self._rescue(job, identity, msg)
                return
            job.started = job.started or isinstance(msg, (Chunk, Done))
            job.trace.answered = time.perf_counter()
            self._deliver(job, msg)
        elif isinstance(msg, protocol.Goodbye):
            if worker is not None:
                logger.info("worker {} says goodbye; no new work goes to it", worker.worker_id)
                worker.draining = True

    def _register(self, identity: bytes, msg: protocol.Register) -> None:
        if msg.version != protocol.PROTOCOL_VERSION:
            reason = (
                f"protocol version {msg.version} not supported (gateway speaks "
                f"{protocol.PROTOCOL_VERSION})"
            )
            logger.warning("rejecting worker {}: {}", msg.worker_id, reason)
            self._send(identity, protocol.Welcome(self.gateway_id, False, reason))
            return
        known = self.workers.get(identity)
        self.workers[identity] = Worker(
            identity=identity,
            worker_id=msg.worker_id,
            models={m.name: m for m in msg.models},
            capacity=msg.capacity,
            load=msg.load,
            last_seen=time.monotonic(),
            inflight=known.inflight if known is not None else set(),
        )
        self.seen_models.update(m.name for m in msg.models)
        metrics.WORKERS.set(len(self.workers))
        logger.info("worker {} registered serving {}", msg.worker_id, [m.name for m in msg.models])
        self._send(identity, protocol.Welcome(self.gateway_id, True))

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            self._beat()

    def _beat(self) -> None:
        """One heartbeat: drop the workers silent for 3, greet the others."""
        now = time.monotonic()
        for identity, worker in list(self.workers.items()):
            if now - worker.last_seen > 3 * self.heartbeat_s:
                self._drop(identity, "silent for 3 heartbeats")
            else:
                self._send(identity, protocol.Heartbeat(sender_id=self.gateway_id))

    def _drop(self, identity: bytes, why: str) -> None:
        worker = self.workers.pop(identity)
        metrics.WORKERS.set(len(self.workers))
        logger.warning(
            "worker {} is dead ({}); {} jobs affected", worker.worker_id, why, len(worker.inflight)
        )
        for request_id in list(worker.inflight):
            job = self.jobs.get(request_id)
            if job is not None:
                self._rescue(job, identity)
        for request_id, (owner, reply) in self.calls.items():
            if owner == identity and not reply.done():
                reply.set_result(Error(request_id, 503, "the worker serving this request died"))

    def _rescue(self, job: Job, failed: bytes, error: Error | None = None) -> None:
        """Retry a job that produced nothing on another worker, once; otherwise end it."""
        rid = job.msg.request_id
        if not job.started and not job.retried:
            try:
                worker = self._pick(job.msg.model, exclude=failed)
            except NoWorker:
                pass
            else:
                job.retried = True
                logger.info("retrying {} on worker {}", rid, worker.worker_id)
                self._send_job(job, worker)
                return
        self._deliver(
            job,
            error
            or Error(request_id=rid, status=503, message="the worker serving this request died"),
        )

    def _deliver(self, job: Job, msg: Result) -> None:
        if isinstance(msg, Done):
            job.open_choices -= 1
        if isinstance(msg, Error) or job.open_choices == 0:
            self._end(job.msg.request_id, abort=False)
        job.deliver(msg)

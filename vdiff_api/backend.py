"""What the serving code asks of the workers behind it: the Backend protocol and the types it
speaks. The dispatcher is the real one; tests put a fake in its place (no sockets, no
workers), since the routes only ever see this face."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from vdiff_common.protocol import Chunk, Done, Error, Generate, Load, ModelInfo, Tokenize, Tokens

Result = Chunk | Done | Error


class NoWorker(Exception):
    """The request cannot be routed; `status` is the answer: 400 (no model named while
    several are served), 404 (a model no worker ever served), 429 (every worker serving it
    is full), 503 (none can serve it now)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Trace:
    """Where and when one HTTP request's jobs went: for the access log and Server-Timing."""

    workers: set[str] = field(default_factory=set)
    sent: float | None = None  # perf_counter when the first job left for a worker
    answered: float = 0.0  # perf_counter when the last result arrived from one

    def flight(self) -> float:
        """Seconds between the first job out and the last result in."""
        return 0.0 if self.sent is None else max(0.0, self.answered - self.sent)


class WorkerState(msgspec.Struct, frozen=True):
    """One worker as the gateway sees it: its last heartbeat's load and our own count."""

    id: str
    models: list[str]
    draining: bool
    capacity: int
    inflight: int  # jobs this gateway sent it that are not finished
    load: Load


class Snapshot(msgspec.Struct, frozen=True):
    """A copy of the backend's state for health, readiness and stats."""

    models: dict[str, ModelInfo]  # what can be routed to now
    workers: list[WorkerState]


class Backend(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def resolve(self, model: str | None) -> ModelInfo:
        """The served model a request names (None: the only one); raises NoWorker."""
        ...

    def snapshot(self) -> Snapshot: ...

    def dispatch(
        self,
        msg: Generate,
        trace: Trace,
        deliver: Callable[[Result], None],
    ) -> str:
        """Send a job (raises NoWorker); `deliver` gets each result, on the event loop,
        until every choice is Done or an Error ends it. Returns the id to abort it by."""
        ...

    def abort(self, request_id: str) -> None:
        """The caller stops listening: a job still running is aborted on its worker."""
        ...

    async def call(self, msg: Tokenize, trace: Trace) -> Tokens | Error:
        """A one-shot request (tokenize, detokenize); raises NoWorker."""
        ...

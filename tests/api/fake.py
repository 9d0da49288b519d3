"""A Backend without sockets or workers: the gateway's routes served in-process."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vdiff_api.backend import NoWorker, Result, Snapshot, Trace, WorkerState
from vdiff_common.protocol import (
    Chunk,
    Done,
    Error,
    Generate,
    Load,
    ModelInfo,
    Tokenize,
    Tokens,
)

Answer = Callable[[Generate], list[Result]]


def echo(msg: Generate) -> list[Result]:
    """Choice i answers "<i>" (token id 100 + i), streamed in one Chunk or whole in Done."""
    out: list[Result] = []
    for i in range(msg.n):
        text, ids = f"<{i}>", [100 + i]
        if msg.stream:
            out.append(Chunk(msg.request_id, i, text, ids))
            text, ids = "", []
        out.append(
            Done(
                msg.request_id,
                i,
                "stop",
                prompt_tokens=3,
                completion_tokens=1,
                forward_passes=2,
                text=text,
                token_ids=ids,
            )
        )
    return out


@dataclass
class FakeBackend:
    """Serves `models` by answering every job with `answer`; a test that sets `refusal`
    makes resolve refuse, one that sets `full` makes dispatch refuse."""

    models: list[ModelInfo] = field(default_factory=lambda: [ModelInfo("tiny", 64)])
    answer: Answer = echo
    refusal: NoWorker | None = None
    full: NoWorker | None = None
    started: bool = False
    jobs: list[Generate] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    calls: list[Tokenize] = field(default_factory=list)

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False

    def resolve(self, model: str | None) -> ModelInfo:
        if self.refusal is not None:
            raise self.refusal
        served = {m.name: m for m in self.models}
        if model is None and len(served) == 1:
            return self.models[0]
        if model in served:
            return served[model]
        raise NoWorker(404, f"The model '{model}' does not exist.")

    def snapshot(self) -> Snapshot:
        names = sorted(m.name for m in self.models)
        workers = (
            [
                WorkerState(
                    id="w0",
                    models=names,
                    draining=False,
                    capacity=4,
                    inflight=len(self.jobs) - len(self.aborted),
                    load=Load(running=1, waiting=2),
                )
            ]
            if self.models
            else []
        )
        return Snapshot(models={m.name: m for m in self.models}, workers=workers)

    def dispatch(
        self,
        msg: Generate,
        trace: Trace,
        deliver: Callable[[Result], None],
    ) -> str:
        if self.full is not None:
            raise self.full
        self.jobs.append(msg)
        trace.workers.add("w0")
        for result in self.answer(msg):
            deliver(result)
        return msg.request_id

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def call(self, msg: Tokenize, trace: Trace) -> Tokens | Error:
        self.calls.append(msg)
        if msg.tokens is not None:
            return Tokens(msg.request_id, text=" ".join(map(str, msg.tokens)))
        return Tokens(msg.request_id, tokens=[1, 2, 3])

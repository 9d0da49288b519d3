"""Serving completions and chat: one path from the request body to the response or stream.

The two endpoints differ only in how their responses look, which a :class:`Shape` says; the
path is the same: read and validate the body, plan the jobs, dispatch them, then collect
their results into one response or stream them as server-sent events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from vdiff_api import metrics
from vdiff_api.backend import Backend, NoWorker, Result
from vdiff_api.errors import APIError, from_validation
from vdiff_api.frontdoor import Access, access_of
from vdiff_api.requests import Plan, plan
from vdiff_api.schemas import (
    AssistantMessage,
    ChatCompletionRequest,
    Choice,
    Completion,
    CompletionChunk,
    CompletionRequest,
    Delta,
    StreamChoice,
    Usage,
)
from vdiff_api.sse import DONE, disconnected, event, until_disconnect
from vdiff_common.protocol import Chunk, Done, Error, ModelInfo

T = TypeVar("T")
Results = AsyncGenerator[tuple[int, Result], None]


@dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class _Usage:
    prompt: dict[str, int] = field(default_factory=dict)
    completion: int = 0
    forward_passes: int = 0
    worker_s: float = 0.0  # the slowest choice's time inside its worker

    def add(self, done: Done) -> None:
        self.prompt[done.request_id] = done.prompt_tokens
        self.completion += done.completion_tokens
        self.forward_passes += done.forward_passes
        self.worker_s = max(self.worker_s, done.worker_s)

    def timing(self, access: Access) -> str:
        """Server-Timing: the gateway's own time (request in - its body read - to job out,
        result in to response out), the transport's (the rest of the round trip: sockets and
        the worker's network side) and the worker's (job arrival to its last result)."""
        total = time.perf_counter() - (access.received or access.start)
        flight = access.trace.flight()
        gateway = max(0.0, total - flight)
        transport = max(0.0, flight - self.worker_s)
        metrics.GATEWAY_OVERHEAD.observe(gateway)
        metrics.TRANSPORT_OVERHEAD.observe(transport)
        return (
            f"gateway;dur={gateway * 1000:.3f}, transport;dur={transport * 1000:.3f}, "
            f"worker;dur={self.worker_s * 1000:.3f}"
        )

    def totals(self) -> Usage:
        p = sum(self.prompt.values())
        return Usage(p, self.completion, p + self.completion, self.forward_passes)


@dataclass(frozen=True)
class Shape:
    """How one endpoint's responses look: completions carry text, chat an assistant message."""

    schema: type[CompletionRequest] | type[ChatCompletionRequest]
    prefix: str  # of the response id
    kind: str  # the response's "object"
    chunk_kind: str  # a streamed chunk's

    @property
    def chat(self) -> bool:
        return self.schema is ChatCompletionRequest

    def choice(self, index: int, c: _Choice, token_ids: bool) -> Choice:
        """One whole choice of a response."""
        out = Choice(index, c.finish_reason, token_ids=c.token_ids if token_ids else msgspec.UNSET)
        if self.chat:
            out.message = AssistantMessage(c.text)
        else:
            out.text = c.text
        return out

    def opening(self, choices: int) -> list[StreamChoice]:
        """What a stream sends before any text: chat names the assistant's role per choice."""
        if not self.chat:
            return []
        return [
            StreamChoice(i, None, delta=Delta(role="assistant", content="")) for i in range(choices)
        ]

    def delta(
        self,
        index: int,
        with_ids: bool,
        text: str = "",
        token_ids: list[int] | None = None,
        finish: str | None = None,
    ) -> StreamChoice:
        """One streamed choice: new text (and its ids), or the finish with an empty delta."""
        out = StreamChoice(index, finish)
        if self.chat:
            out.delta = Delta(content=text) if token_ids is not None else Delta()
        else:
            out.text = text
        if with_ids and token_ids is not None:
            out.token_ids = token_ids
        return out


COMPLETION = Shape(CompletionRequest, "cmpl-", "text_completion", "text_completion")
CHAT = Shape(ChatCompletionRequest, "chatcmpl-", "chat.completion", "chat.completion.chunk")


async def _chain(first: tuple[int, Result], rest: Results) -> Results:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()


class Serving:
    """Request bodies, model resolution and the completions / chat path."""

    def __init__(self, backend: Backend, max_request_bytes: int, draining: Callable[[], bool]):
        self.backend = backend
        self.max_request_bytes = max_request_bytes
        self.draining = draining
        self.active = 0  # generation requests in flight

    async def decode(self, request: Request, schema: type[T]) -> T:
        """The request body as `schema`; new work is refused while draining."""
        if self.draining():
            raise APIError(503, "server is shutting down")
        body = await self._body(request)
        try:
            return msgspec.json.decode(body, type=schema)
        except msgspec.MsgspecError as err:
            raise from_validation(err) from None
        except RecursionError:
            raise APIError(400, "request body is nested too deeply") from None
        except UnicodeDecodeError as err:
            raise APIError(400, f"request body is not valid UTF-8: {err.reason}") from None

    async def _body(self, request: Request) -> bytes:
        limit = self.max_request_bytes
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limit:
            raise APIError(413, f"request body is larger than {limit} bytes")
        chunks, total = [], 0
        async for part in request.stream():
            total += len(part)
            if total > limit:
                raise APIError(413, f"request body is larger than {limit} bytes")
            chunks.append(part)
        access_of(request).received = time.perf_counter()
        return b"".join(chunks)

    def resolve(self, name: str | None) -> ModelInfo:
        """The backend's answer to which model a request names, as an HTTP error if none."""
        try:
            return self.backend.resolve(name)
        except NoWorker as err:
            raise APIError(err.status, err.message, param="model") from None

    async def serve(self, request: Request, shape: Shape) -> Response:
        access = access_of(request)
        rid = access.request_id
        try:
            req = await self.decode(request, shape.schema)
            the_plan = plan(req, rid, self.resolve(req.model))
        except APIError as err:
            metrics.FAILURE.labels("", str(err.status)).inc()
            return err.response()
        access.model = the_plan.model
        start = time.perf_counter()
        # A stream watches for the client leaving in until_disconnect; a plain request here.
        results = self._results(the_plan, access, None if the_plan.stream else request)
        first = await anext(results)
        if isinstance(first[1], Error):
            await results.aclose()
            self._account(access, the_plan, _Usage(), start, first[1].status)
            return APIError(first[1].status, first[1].message, first[1].param).response()
        if the_plan.stream:
            body = self._stream(access, the_plan, shape, start, _chain(first, results))
            return StreamingResponse(
                until_disconnect(request, body), media_type="text/event-stream"
            )
        return await self._collect(access, the_plan, shape, start, _chain(first, results))

    async def _results(
        self,
        the_plan: Plan,
        access: Access,
        watch: Request | None = None,
    ) -> Results:
        """Merge the results of all jobs; yields (global choice index, message) until every
        choice is done or an Error arrives. Results are put on the queue by the backend
        as they come off the socket: no task per job between them and this generator.
        With `watch`, the client closing its connection ends it with a 499 Error (and the
        jobs are aborted on their workers)."""
        queue: asyncio.Queue[tuple[int, Result]] = asyncio.Queue()
        started: list[str] = []
        self.active += 1
        metrics.ACTIVE.inc()

        async def left(request: Request) -> None:
            await disconnected(request)
            queue.put_nowait((0, Error(access.request_id, 499, "the client closed the connection")))

        gone = asyncio.ensure_future(left(watch)) if watch is not None else None
        try:
            for k, job in enumerate(the_plan.jobs):

                def deliver(msg: Result, k: int = k) -> None:
                    queue.put_nowait(
                        (k * the_plan.n + (0 if isinstance(msg, Error) else msg.index), msg)
                    )

                try:
                    started.append(self.backend.dispatch(job, access.trace, deliver))
                except NoWorker as err:
                    yield 0, Error(job.request_id, err.status, err.message)
                    return
            remaining = len(the_plan.jobs) * the_plan.n
            while remaining:
                item = await queue.get()
                yield item
                if isinstance(item[1], Error):
                    return
                if isinstance(item[1], Done):
                    remaining -= 1
        finally:
            if gone is not None:
                gone.cancel()
            for rid in started:
                self.backend.abort(rid)  # what is still running: the client left
            self.active -= 1
            metrics.ACTIVE.dec()

    def _account(
        self, access: Access, the_plan: Plan, usage: _Usage, start: float, status: int
    ) -> None:
        latency = time.perf_counter() - start
        if status == 200:
            metrics.SUCCESS.labels(the_plan.model).inc()
        else:
            metrics.FAILURE.labels(the_plan.model, str(status)).inc()
        metrics.LATENCY.labels(the_plan.model).observe(latency)
        metrics.PROMPT_TOKENS.labels(the_plan.model).inc(sum(usage.prompt.values()))
        metrics.GENERATION_TOKENS.labels(the_plan.model).inc(usage.completion)
        access.status = status
        access.prompt_tokens = sum(usage.prompt.values())
        access.completion_tokens = usage.completion

    async def _collect(
        self, access: Access, the_plan: Plan, shape: Shape, start: float, results: Results
    ) -> Response:
        choices = [_Choice() for _ in range(len(the_plan.jobs) * the_plan.n)]
        usage = _Usage()
        try:
            async for index, msg in results:
                if isinstance(msg, Error):
                    self._account(access, the_plan, usage, start, msg.status)
                    return APIError(msg.status, msg.message, msg.param).response()
                choices[index].text += msg.text
                choices[index].token_ids += msg.token_ids
                if isinstance(msg, Done):
                    choices[index].finish_reason = msg.finish_reason
                    usage.add(msg)
        finally:
            await results.aclose()  # now, not when collected: it ends the jobs and the watch
        self._account(access, the_plan, usage, start, 200)
        body = Completion(
            id=shape.prefix + access.request_id,
            object=shape.kind,
            created=int(time.time()),
            model=the_plan.model,
            choices=[shape.choice(i, c, the_plan.return_token_ids) for i, c in enumerate(choices)],
            usage=usage.totals(),
        )
        return Response(
            msgspec.json.encode(body),
            media_type="application/json",
            headers={"server-timing": usage.timing(access)},
        )

    async def _stream(
        self, access: Access, the_plan: Plan, shape: Shape, start: float, results: Results
    ) -> AsyncGenerator[bytes, None]:
        created = int(time.time())
        usage = _Usage()
        first = True
        ids = the_plan.return_token_ids

        def chunk(
            choices: list[StreamChoice], usage: Usage | msgspec.UnsetType = msgspec.UNSET
        ) -> bytes:
            return event(
                CompletionChunk(
                    shape.prefix + access.request_id,
                    shape.chunk_kind,
                    created,
                    the_plan.model,
                    choices,
                    usage,
                )
            )

        for opening in shape.opening(len(the_plan.jobs) * the_plan.n):
            yield chunk([opening])
        status, streamed, ended = 200, 0, False
        try:
            async for index, msg in results:
                if isinstance(msg, Error):
                    status = msg.status
                    yield event(APIError(msg.status, msg.message, msg.param).body())
                    break
                if first:
                    metrics.TTFC.labels(the_plan.model).observe(time.perf_counter() - start)
                    first = False
                if isinstance(msg, Chunk) or msg.text or msg.token_ids:
                    streamed += len(msg.token_ids)
                    yield chunk([shape.delta(index, ids, msg.text, msg.token_ids)])
                if isinstance(msg, Done):
                    usage.add(msg)
                    yield chunk([shape.delta(index, ids, finish=msg.finish_reason)])
            ended = True
        finally:
            if not ended:  # the client left: 499, as nginx logs it
                usage.completion = max(usage.completion, streamed)
                self._account(access, the_plan, usage, start, 499)
            await results.aclose()  # frees the job even when the client left
        if status == 200:
            usage.timing(access)
        if status == 200 and the_plan.include_usage:
            yield chunk([], usage.totals())
        self._account(access, the_plan, usage, start, status)
        yield DONE

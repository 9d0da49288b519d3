"""The Starlette application: OpenAI routes, health, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from vdiff_api import __version__, metrics, openapi
from vdiff_api.backend import Backend, NoWorker, Result, Snapshot
from vdiff_api.errors import APIError, from_validation
from vdiff_api.frontdoor import Access, FrontDoor, Policy, access_of
from vdiff_api.requests import Plan, messages, plan
from vdiff_api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from vdiff_common.protocol import Chunk, Done, Error, ModelInfo, Tokenize, Tokens

T = TypeVar("T")


@dataclass
class Settings:
    max_request_bytes: int = 1 << 20
    expected_models: list[str] = field(default_factory=list)


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

    def as_dict(self) -> dict[str, int]:
        p = sum(self.prompt.values())
        return {
            "prompt_tokens": p,
            "completion_tokens": self.completion,
            "total_tokens": p + self.completion,
            "forward_passes": self.forward_passes,
        }


def _card(info: ModelInfo) -> dict[str, object]:
    """A model as OpenAI lists it, with vLLM's max_model_len."""
    return {
        "id": info.name,
        "object": "model",
        "created": 0,
        "owned_by": "vdiff",
        "root": info.name,
        "max_model_len": info.max_model_len,
    }


async def _chain(
    first: tuple[int, Result],
    rest: AsyncGenerator[tuple[int, Result], None],
) -> AsyncGenerator[tuple[int, Result], None]:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()


async def _until_disconnect(
    request: Request, body: AsyncGenerator[bytes, None], keepalive: float = 0.5
) -> AsyncIterator[bytes]:
    """Yield from `body`; stop it as soon as the client is gone.

    A diffusion block can take a while, and an HTTP/1.1 server only notices a closed
    connection when it writes; an SSE comment line during silence makes that write happen,
    and the disconnect event (where the server delivers one) ends it at once.
    """

    async def disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    gone: asyncio.Future[Any] = asyncio.ensure_future(disconnect())
    nxt: asyncio.Future[Any] | None = None
    try:
        while not gone.done():
            pending: asyncio.Future[Any] = nxt or asyncio.ensure_future(anext(body))
            nxt = pending
            await asyncio.wait(
                [pending, gone], timeout=keepalive, return_when=asyncio.FIRST_COMPLETED
            )
            if not pending.done():
                yield b": keep-alive\n\n"
                continue
            nxt = None
            try:
                chunk: bytes = pending.result()
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        gone.cancel()
        if nxt is not None and not nxt.done():
            nxt.cancel()  # the body's own clean-up then runs in that task
        else:
            await body.aclose()


class Gateway:
    def __init__(self, backend: Backend, settings: Settings, policy: Policy | None = None) -> None:
        self.backend = backend
        self.settings = settings
        self.policy = policy or Policy()
        self.draining = False
        self.active = 0
        self.starlette = Starlette(
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                # :path, since a served name may hold a slash ("org/model"; the SDK sends %2F)
                Route("/v1/models/{model:path}", self.retrieve_model, methods=["GET"]),
                Route("/v1/engine/stats", self.engine_stats, methods=["GET"]),
                Route("/tokenize", self.tokenize, methods=["POST"]),
                Route("/detokenize", self.detokenize, methods=["POST"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/health/live", self.live, methods=["GET"]),
                Route("/health/ready", self.ready, methods=["GET"]),
                Route("/metrics", self.metrics, methods=["GET"]),
                Route("/version", self.version, methods=["GET"]),
                Route("/openapi.json", self.openapi, methods=["GET"]),
                Route("/docs", self.docs, methods=["GET"]),
                Mount("/docs/assets", StaticFiles(directory=str(swagger_ui_path))),
            ],
            lifespan=self._lifespan,
        )
        self.app = FrontDoor(self.starlette, self.policy, lambda: self.draining)
        self.spec = openapi.spec(self.starlette.routes, __version__, self.policy.needs_key)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.backend.start()
        try:
            yield
        finally:
            await self.backend.stop()

    # ---- health & info ---------------------------------------------------------------------
    def is_ready(self, state: Snapshot) -> bool:
        if self.draining or not state.models:
            return False
        return all(m in state.models for m in self.settings.expected_models)

    async def live(self, request: Request) -> Response:
        """Liveness: the gateway process answers."""
        return JSONResponse({"status": "alive"})

    async def ready(self, request: Request) -> Response:
        """Readiness: 200 once a worker serves every expected model; 503 while draining."""
        ok = self.is_ready(self.backend.snapshot())
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def health(self, request: Request) -> Response:
        """Gateway and worker state: readiness, draining, requests in flight, workers."""
        state = self.backend.snapshot()
        workers = [
            {
                "id": w.id,
                "models": w.models,
                "draining": w.draining,
                "running": w.load.running,
                "waiting": w.load.waiting,
                "inflight": w.inflight,
            }
            for w in state.workers
        ]
        ok = self.is_ready(state)
        return JSONResponse(
            {
                "status": "ok" if ok else "unavailable",
                "ready": ok,
                "draining": self.draining,
                "active_requests": self.active,
                "workers": workers,
            },
            status_code=200 if ok else 503,
        )

    async def metrics(self, request: Request) -> Response:
        """Prometheus metrics of this gateway."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def version(self, request: Request) -> Response:
        """The vdiff version."""
        return JSONResponse({"version": __version__})

    async def openapi(self, request: Request) -> Response:
        """This document: OpenAPI 3.0, request bodies from the msgspec schemas."""
        return JSONResponse(self.spec)

    async def docs(self, request: Request) -> Response:
        """Swagger UI over /openapi.json, its files served here (no CDN)."""
        return HTMLResponse(openapi.DOCS_HTML)

    async def engine_stats(self, request: Request) -> Response:
        """Per-worker engine statistics: load, steps per second, batch sizes."""
        workers = [
            {
                "id": w.id,
                "models": w.models,
                "running": w.load.running,
                "waiting": w.load.waiting,
                "free_slots": w.load.free_slots,
                "inflight": w.inflight,
                "capacity": w.capacity,
                "steps_per_s": w.load.steps_per_s,
                "tokens_per_forward": w.load.tokens_per_forward,
                "batch_size": {"mean": w.load.batch_mean, "max": w.load.batch_max},
                "model_calls": w.load.model_calls,
                "model_rows": w.load.model_rows,
                "aborted": w.load.aborted,
            }
            for w in self.backend.snapshot().workers
        ]
        return JSONResponse({"workers": workers})

    async def list_models(self, request: Request) -> Response:
        """The models the connected workers serve (OpenAI list of models)."""
        data = [_card(m) for m in self.backend.snapshot().models.values()]
        return JSONResponse({"object": "list", "data": data})

    async def retrieve_model(self, request: Request) -> Response:
        """One served model (OpenAI retrieve model); 404 for a model no worker ever served."""
        try:
            info = self._resolve(request.path_params["model"])
        except APIError as err:
            return err.response()
        return JSONResponse(_card(info))

    # ---- tokenizer -----------------------------------------------------------------------
    async def tokenize(self, request: Request) -> Response:
        """Token ids of a prompt, or of chat messages after the chat template.

        vLLM's shape: {model, prompt | messages} gives {count, max_model_len, tokens}.
        """
        try:
            req = await self._decode(request, TokenizeRequest)
            if (req.prompt is None) == (req.messages is None):
                raise APIError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
            chat = messages(req.messages) if req.messages is not None else None
            info, reply = await self._tokenizer(
                request, req.model, prompt=req.prompt, messages=chat
            )
        except APIError as err:
            return err.response()
        return JSONResponse(
            {
                "count": len(reply.tokens),
                "max_model_len": info.max_model_len,
                "tokens": reply.tokens,
            }
        )

    async def detokenize(self, request: Request) -> Response:
        """The text of token ids (vLLM's shape: {model, tokens} gives {prompt})."""
        try:
            req = await self._decode(request, DetokenizeRequest)
            _, reply = await self._tokenizer(request, req.model, tokens=req.tokens)
        except APIError as err:
            return err.response()
        return JSONResponse({"prompt": reply.text})

    async def _tokenizer(
        self,
        request: Request,
        model: str | None,
        **fields: Any,
    ) -> tuple[ModelInfo, Tokens]:
        """Ask a worker serving `model` to (de)tokenize; its errors become APIErrors."""
        access = access_of(request)
        info = self._resolve(model)
        access.model = info.name
        msg = Tokenize(request_id=access.request_id, model=info.name, **fields)
        try:
            reply = await self.backend.call(msg, access.trace)
        except NoWorker as err:
            raise APIError(err.status, err.message, param="model") from None
        if isinstance(reply, Error):
            raise APIError(reply.status, reply.message, reply.param)
        return info, reply

    # ---- generation ----------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        """OpenAI completions, streaming or not, with the diffusion fields."""
        return await self._generate(request, CompletionRequest, chat=False)

    async def chat(self, request: Request) -> Response:
        """OpenAI chat completions, streaming or not, with the diffusion fields."""
        return await self._generate(request, ChatCompletionRequest, chat=True)

    async def _generate(self, request: Request, schema: type, chat: bool) -> Response:
        access = access_of(request)
        rid = access.request_id
        try:
            the_plan = await self._plan(request, schema, rid)
        except APIError as err:
            metrics.FAILURE.labels("", str(err.status)).inc()
            return err.response()
        access.model = the_plan.model
        start = time.perf_counter()
        # A stream watches for the client leaving in _until_disconnect; a plain request here.
        results = self._results(the_plan, access, None if the_plan.stream else request)
        first = await anext(results)
        if isinstance(first[1], Error):
            await results.aclose()
            self._account(access, the_plan, _Usage(), start, first[1].status)
            return APIError(first[1].status, first[1].message, first[1].param).response()
        if the_plan.stream:
            body = self._stream(access, the_plan, chat, start, _chain(first, results))
            return StreamingResponse(
                _until_disconnect(request, body), media_type="text/event-stream"
            )
        return await self._collect(access, the_plan, start, chat, _chain(first, results))

    async def _plan(self, request: Request, schema: type, rid: str) -> Plan:
        req: CompletionRequest | ChatCompletionRequest = await self._decode(request, schema)
        info = self._resolve(req.model)
        return plan(req, rid, info)

    async def _decode(self, request: Request, schema: type[T]) -> T:
        """The request body as `schema`; new work is refused while draining."""
        if self.draining:
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
        limit = self.settings.max_request_bytes
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

    def _resolve(self, name: str | None) -> ModelInfo:
        """The backend's answer to which model a request names, as an HTTP error if none."""
        try:
            return self.backend.resolve(name)
        except NoWorker as err:
            raise APIError(err.status, err.message, param="model") from None

    async def _results(
        self,
        the_plan: Plan,
        access: Access,
        watch: Request | None = None,
    ) -> AsyncGenerator[tuple[int, Result], None]:
        """Merge the results of all jobs; yields (global choice index, message) until every
        choice is done or an Error arrives. Results are put on the queue by the backend
        as they come off the socket: no task per job between them and this generator.
        With `watch`, the client closing its connection ends it with a 499 Error (and the
        jobs are aborted on their workers)."""
        queue: asyncio.Queue[tuple[int, Result]] = asyncio.Queue()
        started: list[str] = []
        self.active += 1
        metrics.ACTIVE.inc()

        async def disconnect(request: Request) -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            queue.put_nowait((0, Error(access.request_id, 499, "the client closed the connection")))

        gone = asyncio.ensure_future(disconnect(watch)) if watch is not None else None
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
        self,
        access: Access,
        the_plan: Plan,
        start: float,
        chat: bool,
        results: AsyncGenerator[tuple[int, Result], None],
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
        out = []
        for i, c in enumerate(choices):
            item: dict[str, object] = {
                "index": i,
                "finish_reason": c.finish_reason,
                "logprobs": None,
            }
            if chat:
                item["message"] = {"role": "assistant", "content": c.text}
            else:
                item["text"] = c.text
            if the_plan.return_token_ids:
                item["token_ids"] = c.token_ids
            out.append(item)
        body = {
            "id": ("chatcmpl-" if chat else "cmpl-") + access.request_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": the_plan.model,
            "choices": out,
            "usage": usage.as_dict(),
        }
        return JSONResponse(body, headers={"server-timing": usage.timing(access)})

    @staticmethod
    def _delta(
        index: int,
        chat: bool,
        the_plan: Plan,
        text: str = "",
        token_ids: list[int] | None = None,
        finish: str | None = None,
    ) -> dict[str, object]:
        """One streamed choice: new text (and its ids), or the finish with an empty delta."""
        choice: dict[str, object] = {"index": index, "logprobs": None, "finish_reason": finish}
        if chat:
            choice["delta"] = {"content": text} if token_ids is not None else {}
        else:
            choice["text"] = text
        if the_plan.return_token_ids and token_ids is not None:
            choice["token_ids"] = token_ids
        return choice

    async def _stream(
        self,
        access: Access,
        the_plan: Plan,
        chat: bool,
        start: float,
        results: AsyncGenerator[tuple[int, Result], None],
    ) -> AsyncGenerator[bytes, None]:
        cid = ("chatcmpl-" if chat else "cmpl-") + access.request_id
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        usage = _Usage()
        first = True

        def event(choices: list[dict[str, object]], **extra: object) -> bytes:
            body = {
                "id": cid,
                "object": kind,
                "created": created,
                "model": the_plan.model,
                "choices": choices,
                **extra,
            }
            return b"data: " + json.dumps(body).encode() + b"\n\n"

        if chat:
            for i in range(len(the_plan.jobs) * the_plan.n):
                yield event(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
        status, streamed, ended = 200, 0, False
        try:
            async for index, msg in results:
                if isinstance(msg, Error):
                    status = msg.status
                    err = APIError(msg.status, msg.message, msg.param)
                    yield b"data: " + json.dumps(err.body()).encode() + b"\n\n"
                    break
                if first:
                    metrics.TTFC.labels(the_plan.model).observe(time.perf_counter() - start)
                    first = False
                if isinstance(msg, Chunk) or msg.text or msg.token_ids:
                    streamed += len(msg.token_ids)
                    yield event([self._delta(index, chat, the_plan, msg.text, msg.token_ids)])
                if isinstance(msg, Done):
                    usage.add(msg)
                    yield event([self._delta(index, chat, the_plan, finish=msg.finish_reason)])
            ended = True
        finally:
            if not ended:  # the client left: 499, as nginx logs it
                usage.completion = max(usage.completion, streamed)
                self._account(access, the_plan, usage, start, 499)
            await results.aclose()  # frees the job even when the client left
        if status == 200:
            usage.timing(access)
        if status == 200 and the_plan.include_usage:
            yield event([], usage=usage.as_dict())
        self._account(access, the_plan, usage, start, status)
        yield b"data: [DONE]\n\n"

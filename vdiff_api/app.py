"""The Starlette application: its routes, health and info; generation is vdiff_api.serving."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from vdiff_api import __version__, openapi
from vdiff_api.backend import Backend, NoWorker, Snapshot
from vdiff_api.errors import APIError
from vdiff_api.frontdoor import FrontDoor, Policy, access_of
from vdiff_api.requests import messages
from vdiff_api.schemas import DetokenizeRequest, TokenizeRequest
from vdiff_api.serving import CHAT, COMPLETION, Serving
from vdiff_common.protocol import Error, ModelInfo, Tokenize, Tokens


@dataclass
class Settings:
    max_request_bytes: int = 1 << 20
    expected_models: list[str] = field(default_factory=list)


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


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return APIError(exc.status_code, exc.detail, headers=dict(exc.headers or {})).response()


class Gateway:
    def __init__(self, backend: Backend, settings: Settings, policy: Policy | None = None) -> None:
        self.backend = backend
        self.settings = settings
        self.policy = policy or Policy()
        self.draining = False
        self.serving = Serving(backend, settings.max_request_bytes, lambda: self.draining)
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
            # Starlette's own answers (no route, a wrong method) in OpenAI's shape too.
            exception_handlers={HTTPException: _http_error},
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

    @property
    def active(self) -> int:
        """Generation requests in flight."""
        return self.serving.active

    # ---- generation --------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        """OpenAI completions, streaming or not, with the diffusion fields."""
        return await self.serving.serve(request, COMPLETION)

    async def chat(self, request: Request) -> Response:
        """OpenAI chat completions, streaming or not, with the diffusion fields."""
        return await self.serving.serve(request, CHAT)

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
            info = self.serving.resolve(request.path_params["model"])
        except APIError as err:
            return err.response()
        return JSONResponse(_card(info))

    # ---- tokenizer -----------------------------------------------------------------------
    async def tokenize(self, request: Request) -> Response:
        """Token ids of a prompt, or of chat messages after the chat template.

        vLLM's shape: {model, prompt | messages} gives {count, max_model_len, tokens}.
        """
        try:
            req = await self.serving.decode(request, TokenizeRequest)
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
            req = await self.serving.decode(request, DetokenizeRequest)
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
        info = self.serving.resolve(model)
        access.model = info.name
        msg = Tokenize(request_id=access.request_id, model=info.name, **fields)
        try:
            reply = await self.backend.call(msg, access.trace)
        except NoWorker as err:
            raise APIError(err.status, err.message, param="model") from None
        if isinstance(reply, Error):
            raise APIError(reply.status, reply.message, reply.param)
        return info, reply

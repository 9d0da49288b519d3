"""The gateway's front door, as pure ASGI middleware (streams pass through untouched):
request ids, the client's address, API keys, rate limits, one access line per request."""

from __future__ import annotations

import argparse
import ipaddress
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vdiff_api.auth import APIKeys
from vdiff_api.backend import Trace
from vdiff_api.errors import APIError
from vdiff_api.ratelimit import RateLimiter

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_RID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_KEYED = ("/tokenize", "/detokenize")
_PROBES = ("/health", "/health/live", "/health/ready", "/metrics")  # logged at DEBUG


@dataclass
class Access:
    """What one request did; the routes fill in model, tokens and the trace."""

    request_id: str
    method: str
    path: str
    client: str
    who: str  # rate-limit identity: "key:<fingerprint>" or "ip:<address>"
    start: float = field(default_factory=time.perf_counter)
    received: float | None = None  # when the whole body was in (a client may send it late)
    status: int = 0
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    trace: Trace = field(default_factory=Trace)


def access_of(request: Request) -> Access:
    access: Access = request.scope["vdiff.access"]
    return access


@dataclass
class Policy:
    keys: APIKeys = field(default_factory=lambda: APIKeys([]))
    limiter: RateLimiter = field(default_factory=RateLimiter)
    trusted_proxies: list[Network] = field(default_factory=list)
    protect_metrics: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Policy:
        """Raises ValueError naming the flag that cannot work."""
        keys = APIKeys.load(list(args.api_key), list(args.api_key_file))
        if args.protect_metrics and not keys.enabled:
            raise ValueError("--protect-metrics needs API keys (--api-key or --api-key-file)")
        try:
            limiter = RateLimiter(args.rate_limit_requests, args.rate_limit_tokens)
        except ValueError as err:
            raise ValueError(f"--rate-limit-requests/--rate-limit-tokens: {err}") from None
        trusted = []
        for cidr in args.trusted_proxies:
            try:
                trusted.append(ipaddress.ip_network(cidr.strip(), strict=False))
            except ValueError as err:
                raise ValueError(f"--trusted-proxies: {err}") from None
        return cls(keys, limiter, trusted, args.protect_metrics)

    def needs_key(self, path: str) -> bool:
        if not self.keys.enabled:
            return False
        return (
            path.startswith("/v1/")
            or path == "/v1"
            or path in _KEYED
            or (self.protect_metrics and path == "/metrics")
        )

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted_proxies)

    def client_ip(self, scope: Scope, headers: Headers) -> str:
        """The peer, or, when the peer is a trusted proxy, the nearest untrusted address in
        X-Forwarded-For (read from the right: the left part is whatever the client sent)."""
        peer = str(scope["client"][0]) if scope.get("client") else ""
        if not self._trusted(peer):
            return peer
        hops = [h.strip() for v in headers.getlist("x-forwarded-for") for h in v.split(",")]
        for hop in reversed([h for h in hops if h]):
            peer = hop
            if not self._trusted(hop):
                break
        return peer


class FrontDoor:
    def __init__(
        self, app: ASGIApp, policy: Policy, draining: Callable[[], bool] = lambda: False
    ) -> None:
        self.app = app
        self.policy = policy
        # While draining every answer closes its connection: a client's next request then
        # opens a new one and gets a clear 503 (or a refused connect once the listener is
        # gone), never a keep-alive connection closed under a request it just sent.
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        rid = headers.get("x-request-id", "")
        if not _RID.match(rid):
            rid = uuid.uuid4().hex
        client = self.policy.client_ip(scope, headers)
        path = scope["path"]
        access = Access(
            request_id=rid, method=scope["method"], path=path, client=client, who="ip:" + client
        )
        scope["vdiff.access"] = access
        extra = [(b"x-request-id", rid.encode())]
        settled = False

        def settle() -> None:
            nonlocal settled
            if not settled:
                settled = True
                self.policy.limiter.spend(access.who, access.completion_tokens)

        async def reply(message: Message) -> None:
            if message["type"] == "http.response.start":
                access.status = access.status or message["status"]
                closing = [(b"connection", b"close")] if self.draining() else []
                message = {**message, "headers": [*message.get("headers", []), *extra, *closing]}
            elif not message.get("more_body", False):
                settle()  # before the client can see the end and send its next request
            await send(message)

        try:
            refusal = self._admit(access, headers, extra)
            with logger.contextualize(request_id=rid):  # on every line logged meanwhile
                if refusal is not None:
                    await refusal.response()(scope, receive, reply)
                else:
                    await self.app(scope, receive, reply)
        except Exception:
            access.status = access.status or 500
            raise
        finally:
            settle()
            _log(access)

    def _admit(
        self, access: Access, headers: Headers, extra: list[tuple[bytes, bytes]]
    ) -> APIError | None:
        policy = self.policy
        if policy.needs_key(access.path):
            name = policy.keys.check(headers.get("authorization"))
            if name is None:
                given = headers.get("authorization") is not None
                return APIError(
                    401,
                    "invalid API key"
                    if given
                    else "missing API key: send the header 'Authorization: Bearer <key>'",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            access.who = "key:" + name
        if policy.limiter.enabled and access.path.startswith("/v1/"):
            decision = policy.limiter.admit(access.who)
            extra += [(k.encode(), v.encode()) for k, v in decision.headers.items()]
            if decision.refused is not None:
                what = "requests" if decision.refused == "requests" else "generated tokens"
                return APIError(
                    429,
                    f"rate limit reached for {what} per minute; retry in {decision.retry_after}s",
                    headers={"Retry-After": str(decision.retry_after)},
                )
        return None


def _log(access: Access) -> None:
    latency = time.perf_counter() - access.start
    workers = ",".join(sorted(access.trace.workers))
    fields: dict[str, Any] = {
        "access": True,
        "request_id": access.request_id,
        "method": access.method,
        "path": access.path,
        "status": access.status,
        "model": access.model,
        "latency_s": round(latency, 4),
        "prompt_tokens": access.prompt_tokens,
        "completion_tokens": access.completion_tokens,
        "worker": workers,
        "client": access.client,
        "principal": access.who,
    }
    level = "DEBUG" if access.path in _PROBES else "INFO"
    logger.bind(**fields).log(
        level,
        "{} {} {} status={} model={} latency={:.3f}s prompt_tokens={} "
        "completion_tokens={} worker={} by={}",
        access.request_id,
        access.method,
        access.path,
        access.status,
        access.model or "-",
        latency,
        access.prompt_tokens,
        access.completion_tokens,
        workers or "-",
        access.who,
    )

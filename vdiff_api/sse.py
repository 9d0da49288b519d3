"""Server-sent events: the event frame, and watching for the client leaving.

``disconnected`` is the one watcher of a client that goes away: a stream stops writing when it
fires, and a request that is not streamed ends its jobs with a 499.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import msgspec
from starlette.requests import Request

_json = msgspec.json.Encoder()
DONE = b"data: [DONE]\n\n"  # OpenAI's end of a stream


def event(body: object) -> bytes:
    """One SSE ``data:`` event carrying ``body`` as JSON."""
    return b"data: " + _json.encode(body) + b"\n\n"


async def disconnected(request: Request) -> None:
    """Returns when the client has closed its connection (the server's disconnect event)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(
    request: Request, body: AsyncGenerator[bytes, None], keepalive: float = 0.5
) -> AsyncIterator[bytes]:
    """Yield from `body`; stop it as soon as the client is gone.

    A diffusion block can take a while, and an HTTP/1.1 server only notices a closed
    connection when it writes; an SSE comment line during silence makes that write happen,
    and the disconnect event (where the server delivers one) ends it at once.
    """
    gone: asyncio.Future[Any] = asyncio.ensure_future(disconnected(request))
    nxt: asyncio.Future[Any] | None = None
    try:
        while not gone.done():
            pending: asyncio.Future[Any] = nxt or asyncio.ensure_future(anext(body))
            nxt = pending
            await asyncio.wait(
                [pending, gone], timeout=keepalive, return_when=asyncio.FIRST_COMPLETED
            )
            if not pending.done():
                if not gone.done():  # silence, not the client leaving
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

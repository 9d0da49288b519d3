"""SSE framing and the one disconnect watcher, in-process: keep-alive comments during
silence, the body stopped (its clean-up run) as soon as the client leaves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import Request

from vdiff_api.sse import DONE, event, until_disconnect


def test_an_event_is_one_data_line_of_json() -> None:
    assert event({"a": [1, "é"]}) == 'data: {"a":[1,"é"]}\n\n'.encode()
    assert DONE == b"data: [DONE]\n\n"


class Client:
    """A request whose client leaves when told to (the ASGI disconnect message)."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    def request(self) -> Request:
        return Request({"type": "http", "method": "POST", "headers": []}, self.receive)


def test_silence_sends_keep_alives_and_the_body_runs_to_its_end() -> None:
    async def main() -> list[bytes]:
        async def body() -> AsyncGenerator[bytes, None]:
            yield b"one"
            await asyncio.sleep(0.35)
            yield b"two"

        return [c async for c in until_disconnect(Client().request(), body(), keepalive=0.1)]

    out = asyncio.run(main())
    assert out[0] == b"one" and out[-1] == b"two"
    assert set(out[1:-1]) == {b": keep-alive\n\n"} and len(out) >= 4


def test_a_client_that_leaves_stops_the_body() -> None:
    async def main() -> tuple[list[bytes], list[str]]:
        client, log = Client(), []

        async def body() -> AsyncGenerator[bytes, None]:
            try:
                yield b"first"
                await asyncio.Event().wait()  # a block that never finishes
                yield b"never"
            finally:
                log.append("body closed")

        out = []
        async for chunk in until_disconnect(client.request(), body(), keepalive=10):
            out.append(chunk)
            client.gone.set()
        await asyncio.sleep(0)  # the cancelled body task runs its clean-up
        return out, log

    out, log = asyncio.run(main())
    assert out == [b"first"] and log == ["body closed"]


def test_a_body_that_finishes_is_closed_by_the_watcher() -> None:
    async def main() -> list[str]:
        log: list[str] = []

        async def body() -> AsyncGenerator[bytes, None]:
            try:
                yield b"only"
            finally:
                log.append("closed")

        gen = until_disconnect(Client().request(), body())
        assert [c async for c in gen] == [b"only"]
        return log

    assert asyncio.run(main()) == ["closed"]

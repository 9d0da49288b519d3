"""--event-loop: uvloop when asked for or installed, the standard loop on request."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from vdiff_common import loop


async def loop_type() -> type:
    return type(asyncio.get_running_loop())


@pytest.mark.parametrize("choice,want", [("uvloop", uvloop.Loop), ("auto", uvloop.Loop)])
def test_uvloop_when_asked_or_installed(choice: str, want: type) -> None:
    assert loop.run(loop_type(), choice) is want


def test_standard_loop_on_request() -> None:
    got = loop.run(loop_type(), "asyncio")
    assert issubclass(got, asyncio.BaseEventLoop) and not issubclass(got, uvloop.Loop)


def test_unknown_loop_is_refused() -> None:
    coro = loop_type()
    with pytest.raises(ValueError, match="--event-loop"):
        loop.run(coro, "trio")
    coro.close()

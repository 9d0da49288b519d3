"""Run a process's main coroutine on the event loop its ``--event-loop`` flag names."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
CHOICES = ("auto", "asyncio", "uvloop")


def run(main: Coroutine[Any, Any, T], loop: str = "auto") -> T:
    """``auto`` takes uvloop when it is installed: its loop costs a fraction of asyncio's per
    socket event, which is most of what a gateway does per request."""
    if loop not in CHOICES:
        raise ValueError(f"--event-loop must be one of {', '.join(CHOICES)}, not {loop!r}")
    if loop == "asyncio" or (loop == "auto" and importlib.util.find_spec("uvloop") is None):
        return asyncio.run(main)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)

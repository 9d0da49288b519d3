"""The engine in-process: what it emits for streamed and non-streamed jobs."""

from __future__ import annotations

import queue

import pytest

from tests.conftest import GOLDEN
from vdiff_common.protocol import Chunk, Done, Generate, Message, SamplingParams
from vdiff_worker.admission import Defaults
from vdiff_worker.engine import Engine
from vdiff_worker.models import load_model


@pytest.fixture(scope="module")
def engine() -> Engine:
    inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
    e = Engine(load_model(str(GOLDEN / "llada-tiny")), Defaults(block_length=8),
               inbox.put)
    e.outbox = inbox  # type: ignore[attr-defined]
    e.start()
    return e


def _run(engine: Engine, stream: bool, n: int = 2) -> list[Message]:
    params = SamplingParams(max_tokens=24, temperature=0.5, seed=5)
    chat = [{"role": "user", "content": "What is 24 + 1?"}]  # golden: "11" at temperature 0
    engine.submit(Generate(f"r-{stream}", "llada-tiny", messages=chat, params=params, n=n,
                           stream=stream))
    out: list[Message] = []
    while sum(isinstance(m, Done) for m in out) < n:
        out.append(engine.outbox.get(timeout=60))  # type: ignore[attr-defined]
    return out


def test_a_job_without_stream_gets_one_done_per_choice_with_the_whole_answer(
        engine: Engine) -> None:
    streamed, whole = _run(engine, stream=True), _run(engine, stream=False)
    assert all(isinstance(m, Done) for m in whole) and len(whole) == 2
    assert any(isinstance(m, Chunk) for m in streamed)
    for index in (0, 1):
        parts = [m for m in streamed if m.index == index]  # type: ignore[union-attr]
        done = next(m for m in whole if m.index == index)  # type: ignore[union-attr]
        assert isinstance(done, Done)
        assert "".join(p.text for p in parts) == done.text  # type: ignore[union-attr]
        assert [t for p in parts for t in p.token_ids] == done.token_ids  # type: ignore[union-attr]
        assert done.token_ids and done.completion_tokens >= len(done.token_ids)

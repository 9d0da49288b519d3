"""The engine in-process: what it emits for streamed and non-streamed jobs."""

from __future__ import annotations

import queue

import pytest

from tests.conftest import GOLDEN
from vdiff_common.protocol import Chunk, Done, Error, Generate, Message, SamplingParams
from vdiff_worker.admission import Defaults
from vdiff_worker.engine import Engine
from vdiff_worker.models import load_model


@pytest.fixture(scope="module")
def engine() -> Engine:
    inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
    e = Engine(load_model(str(GOLDEN / "llada-tiny")), Defaults(block_length=8), inbox.put)
    e.outbox = inbox  # type: ignore[attr-defined]
    e.start()
    return e


def _run(engine: Engine, stream: bool, n: int = 2) -> list[Message]:
    params = SamplingParams(max_tokens=24, temperature=0.5, seed=5)
    chat = [{"role": "user", "content": "What is 24 + 1?"}]  # golden: "11" at temperature 0
    engine.submit(
        Generate(f"r-{stream}", "llada-tiny", messages=chat, params=params, n=n, stream=stream)
    )
    out: list[Message] = []
    while sum(isinstance(m, Done) for m in out) < n:
        out.append(engine.outbox.get(timeout=60))  # type: ignore[attr-defined]
    return out


def test_a_job_without_stream_gets_one_done_per_choice_with_the_whole_answer(
    engine: Engine,
) -> None:
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


def test_a_request_whose_cache_cannot_be_allocated_fails_alone() -> None:
    inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
    # Slots for a million sequences do not fit anywhere: the first cached request finds out.
    e = Engine(
        load_model(str(GOLDEN / "llada-tiny")),
        Defaults(block_length=8),
        inbox.put,
        max_num_seqs=1 << 20,
    )
    e.start()
    try:
        ids = [481, 30, 31, 32]
        e.submit(
            Generate(
                "cached",
                "m",
                prompt_ids=ids,
                stream=False,
                params=SamplingParams(max_tokens=8, decoding="threshold", cache="dual"),
            )
        )
        e.submit(
            Generate(
                "plain",
                "m",
                prompt_ids=ids,
                stream=False,
                params=SamplingParams(max_tokens=8, decoding="threshold", cache="none"),
            )
        )
        got = {m.request_id: m for m in (inbox.get(timeout=60) for _ in range(2))}
    finally:
        e.stop()
    failed = got["cached"]
    assert isinstance(failed, Error) and failed.status == 503
    assert "--max-num-seqs" in failed.message
    assert isinstance(got["plain"], Done)

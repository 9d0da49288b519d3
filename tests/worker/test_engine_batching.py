"""The engine in-process: every mode gives the same tokens alone and batched, and batches.

Each mode decodes golden prompts one at a time, then all at once; the tokens must be equal and
the concurrent run must have put several sequences into its model calls.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import GOLDEN
from vdiff_common.protocol import Done, Error, Generate, Message, SamplingParams
from vdiff_worker.admission import Defaults
from vdiff_worker.engine import Engine
from vdiff_worker.models import load_model

LLADA = [
    c["prompt_ids"]
    for c in json.loads((GOLDEN / "cases" / "shared_llada.json").read_text())["generate"]
    if "prompt_ids" in c
]
DREAM = [
    c["prompt_ids"]
    for c in json.loads((GOLDEN / "cases" / "shared_dream.json").read_text())["generate"]
    if "prompt_ids" in c
]

MODES: list[tuple[str, dict[str, Any]]] = [
    ("llada", {"decoding": "reference", "diffusion_steps": 16, "block_length": 8}),
    ("llada", {"decoding": "reference", "diffusion_steps": 16, "cache": "dual", "block_length": 8}),
    ("llada", {"decoding": "threshold", "cache": "none", "block_length": 8}),
    ("llada", {"decoding": "threshold", "cache": "prefix", "block_length": 8}),
    ("llada", {"decoding": "threshold", "cache": "dual", "block_length": 8}),
    ("llada", {"decoding": "factor", "cache": "dual", "block_length": 8}),
    ("llada", {"block_length": 8}),  # the default
    ("dream", {"decoding": "reference", "diffusion_steps": 16}),
    ("dream", {"decoding": "threshold", "cache": "dual", "block_length": 8}),
    ("dream", {"decoding": "threshold", "cache": "prefix", "block_length": 8}),
    ("dream", {"decoding": "apd", "apd_kv_window": 8, "apd_max_lookahead": 8}),
    ("dream", {"decoding": "apd"}),
    # One token drafted per round: the verifier's pass reads no logits at all.
    ("dream", {"decoding": "apd", "apd_kv_window": 4, "apd_max_lookahead": 1}),
    ("ar", {}),
]


class Harness:
    def __init__(self, engine: Engine, outbox: queue.SimpleQueue[Message]) -> None:
        self.engine, self.outbox = engine, outbox
        self.count = 0

    def run(self, prompts: list[list[int]], **fields: Any) -> list[list[int]]:
        """Submit every prompt at once; their tokens, in order."""
        ids = []
        for p in prompts:
            self.count += 1
            ids.append(f"r{self.count}")
            params = SamplingParams(max_tokens=16, temperature=0.0, eos_early_stop=False, **fields)
            self.engine.submit(Generate(ids[-1], "m", prompt_ids=p, stream=False, params=params))
        done: dict[str, list[int]] = {}
        while len(done) < len(ids):
            msg = self.outbox.get(timeout=120)
            assert not isinstance(msg, Error), msg
            if isinstance(msg, Done):
                done[msg.request_id] = msg.token_ids
        return [done[i] for i in ids]


def _harness(model: str, verifier: str | None = None) -> Iterator[Harness]:
    outbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
    ver = load_model(str(GOLDEN / verifier)).model if verifier else None
    engine = Engine(
        load_model(str(GOLDEN / model)), Defaults(), outbox.put, max_num_seqs=8, verifier=ver
    )
    engine.start()
    yield Harness(engine, outbox)
    engine.stop()


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[str, Harness]]:
    gens = {
        "llada": _harness("llada-tiny"),
        "dream": _harness("dream-tiny", "ar-tiny"),
        "ar": _harness("ar-tiny"),
    }
    yield {k: next(g) for k, g in gens.items()}
    for g in gens.values():
        next(g, None)


@pytest.mark.parametrize(
    ("kind", "fields"), MODES, ids=[f"{k}-" + "-".join(map(str, f.values())) for k, f in MODES]
)
def test_batched_equals_alone(
    engines: dict[str, Harness], kind: str, fields: dict[str, Any]
) -> None:
    h = engines[kind]
    prompts = (LLADA if kind == "llada" else DREAM)[:4]
    alone = [h.run([p], **fields)[0] for p in prompts]
    runner = h.engine.runner
    calls, rows = runner.calls, runner.rows
    together = h.run(prompts, **fields)
    assert together == alone
    assert (runner.rows - rows) / (runner.calls - calls) > 1.5  # they shared model calls


def test_eight_dual_cache_sequences_share_every_call(engines: dict[str, Harness]) -> None:
    h = engines["llada"]
    runner = h.engine.runner
    calls, rows = runner.calls, runner.rows
    h.run([LLADA[0]] * 8, decoding="threshold", cache="dual", block_length=8)
    assert (runner.rows - rows) / (runner.calls - calls) == 8


def test_the_default_is_threshold_with_the_dual_cache(engines: dict[str, Harness]) -> None:
    h = engines["llada"]
    fast = h.run(LLADA[:2], block_length=8)
    assert fast == h.run(
        LLADA[:2], decoding="threshold", cache="dual", threshold=0.9, block_length=8
    )
    calls = h.engine.runner.calls
    h.run(LLADA[:1], block_length=8)
    fast_calls, calls = h.engine.runner.calls - calls, h.engine.runner.calls
    h.run(LLADA[:1], decoding="reference", block_length=8)
    assert fast_calls < h.engine.runner.calls - calls  # parallel: fewer passes than tokens
    # A field only the reference reads selects it rather than being refused.
    assert h.run(LLADA[:1], diffusion_steps=8) == h.run(
        LLADA[:1], decoding="reference", diffusion_steps=8
    )


def test_passes_of_the_busier_model_go_first_and_the_others_wait_one_step(
    engines: dict[str, Harness],
) -> None:
    engine = engines["dream"].engine

    def seq(model: str, waited: bool = False) -> Any:
        return SimpleNamespace(pending=SimpleNamespace(model=model), waited=waited)

    drafts, check = [seq("main"), seq("main")], seq("verifier")
    assert engine._due([*drafts, check]) == drafts  # type: ignore[arg-type]
    assert check.waited
    # Next step the drafts have moved on to their verifier passes: all three share one call,
    # and a pass that waited goes whatever the counts.
    late = seq("main")
    due = engine._due([check, *[seq("verifier") for _ in drafts], late])  # type: ignore[arg-type]
    assert check in due and late not in due and late.waited and not check.waited
    rest = [late, seq("verifier"), seq("verifier")]
    assert engine._due(rest) == rest  # type: ignore[arg-type]
    assert not late.waited

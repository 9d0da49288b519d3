"""The engine in-process: every mode gives the same tokens alone and batched, and batches.

Each mode decodes golden prompts one at a time, then all at once; the tokens must be equal and
the concurrent run must have put several sequences into its model calls.
"""

from __future__ import annotations

import dataclasses
import json
import queue
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.conftest import GOLDEN
from vdiff_common.protocol import Done, Error, Generate, Message, SamplingParams
from vdiff_worker.admission import Defaults
from vdiff_worker.decoding.base import Fetch, Forward
from vdiff_worker.engine import Engine
from vdiff_worker.models import load_model
from vdiff_worker.models.base import ModelOutput

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
LLADA2 = list(
    {
        tuple(c["prompt_ids"]): c["prompt_ids"]
        for c in json.loads((GOLDEN / "cases" / "shared_llada2.json").read_text())["generate"]
    }.values()
)
PROMPTS = {"llada": LLADA, "dream": DREAM, "ar": DREAM, "llada2": LLADA2}

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
    ("llada2", {"decoding": "reference", "block_length": 8}),
    ("llada2", {"decoding": "reference", "cache": "none", "block_length": 8}),
    ("llada2", {"decoding": "editing", "threshold": 0.5, "editing_threshold": 0.5}),
    ("llada2", {"block_length": 4}),  # the default, with blocks of different lengths below
]


class Harness:
    def __init__(self, engine: Engine, outbox: queue.SimpleQueue[Message]) -> None:
        self.engine, self.outbox = engine, outbox
        self.count = 0
        self.transfers = 0  # the runner's fetches, where a test counts them

    def run(self, prompts: list[list[int]], **fields: Any) -> list[list[int]]:
        """Submit every prompt at once; their tokens, in order."""
        return self.run_each([(p, fields) for p in prompts])

    def run_each(self, jobs: list[tuple[list[int], dict[str, Any]]]) -> list[list[int]]:
        """Submit every (prompt, fields) at once; their tokens, in order."""
        ids = []
        for p, fields in jobs:
            self.count += 1
            ids.append(f"r{self.count}")
            base = {"max_tokens": 16, "temperature": 0.0, "eos_early_stop": False}
            params = SamplingParams(**{**base, **fields})
            self.engine.submit(Generate(ids[-1], "m", prompt_ids=p, stream=False, params=params))
        done: dict[str, list[int]] = {}
        while len(done) < len(ids):
            msg = self.outbox.get(timeout=120)
            assert not isinstance(msg, Error), msg
            if isinstance(msg, Done):
                done[msg.request_id] = msg.token_ids
        return [done[i] for i in ids]


def _harness(
    model: str, verifier: str | None = None, wrap: Callable[[Any], Any] = lambda m: m
) -> Iterator[Harness]:
    outbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
    ver = wrap(load_model(str(GOLDEN / verifier)).model) if verifier else None
    loaded = load_model(str(GOLDEN / model))
    loaded = dataclasses.replace(loaded, model=wrap(loaded.model))
    engine = Engine(loaded, Defaults(), outbox.put, max_num_seqs=8, verifier=ver)
    engine.start()
    yield Harness(engine, outbox)
    engine.stop()


def _engines(wrap: Callable[[Any], Any] = lambda m: m) -> Iterator[dict[str, Harness]]:
    gens = {
        "llada": _harness("llada-tiny", wrap=wrap),
        "dream": _harness("dream-tiny", "ar-tiny", wrap=wrap),
        "ar": _harness("ar-tiny", wrap=wrap),
        "llada2": _harness("llada2-tiny", wrap=wrap),
    }
    yield {k: next(g) for k, g in gens.items()}
    for g in gens.values():
        next(g, None)


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[str, Harness]]:
    yield from _engines()


class OnDevice(torch.Tensor):
    """Stands for values on an accelerator: reading one on the host (which would wait for
    the device) raises, except through the runner's fetch."""

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: Any = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        name = getattr(func, "__name__", str(func))
        indexing = name in ("__getitem__", "__setitem__")
        if name in HOST_READS or (indexing and _boolean_index(args[1])):
            raise AssertionError(f"a host read of a device value: {name}")
        return super().__torch_function__(func, types, args, kwargs or {})


# Each makes the host wait for the device (the size of a boolean selection included).
HOST_READS = frozenset(
    {"item", "tolist", "numpy", "cpu", "nonzero", "masked_select", "unique", "equal"}
    | {"__bool__", "__int__", "__float__", "__index__"}
)


def _boolean_index(index: Any) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


class Accelerated(torch.nn.Module):
    """A model whose outputs are OnDevice."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def kv_shape(self) -> Any:
        return self.inner.kv_shape()  # type: ignore[operator]

    def forward(self, *args: Any, **kwargs: Any) -> ModelOutput:
        out = self.inner(*args, **kwargs)
        tokens = out.tokens.as_subclass(OnDevice) if out.tokens is not None else None
        return ModelOutput(logits=out.logits.as_subclass(OnDevice), tokens=tokens)


@pytest.fixture(scope="module")
def accelerated() -> Iterator[dict[str, Harness]]:
    for harnesses in _engines(Accelerated):
        for h in harnesses.values():
            fetch = h.engine.runner.fetch

            def to_host(fetches: list[Fetch], fetch: Any = fetch, h: Harness = h) -> Any:
                h.transfers += 1
                return [tuple(t.as_subclass(torch.Tensor) for t in f) for f in fetch(fetches)]

            h.engine.runner.fetch = to_host  # type: ignore[method-assign]
        yield harnesses


@pytest.mark.parametrize(
    ("kind", "fields"), MODES, ids=[f"{k}-" + "-".join(map(str, f.values())) for k, f in MODES]
)
def test_batched_equals_alone(
    engines: dict[str, Harness], kind: str, fields: dict[str, Any]
) -> None:
    h = engines[kind]
    prompts = PROMPTS[kind][:4]
    alone = [h.run([p], **fields)[0] for p in prompts]
    runner = h.engine.runner
    calls, rows = runner.calls, runner.rows
    together = h.run(prompts, **fields)
    assert together == alone
    assert (runner.rows - rows) / (runner.calls - calls) > 1.5  # they shared model calls


@pytest.mark.parametrize(
    ("kind", "fields"),
    [*MODES, ("dream", {"decoding": "reference", "alg": "origin", "temperature": 0.5, "seed": 3})],
    ids=[f"{k}-" + "-".join(map(str, f.values())) for k, f in MODES] + ["dream-origin"],
)
def test_a_step_waits_for_the_device_once(
    engines: dict[str, Harness],
    accelerated: dict[str, Harness],
    kind: str,
    fields: dict[str, Any],
) -> None:
    # The samplers read the logits only through the engine's one fetch per step: any other
    # host read of a model output fails the step (and the request, with an Error).
    prompts = PROMPTS[kind][:4]
    h = accelerated[kind]
    steps, transfers = h.engine.steps, h.transfers
    assert h.run(prompts, **fields) == engines[kind].run(prompts, **fields)
    # Dream's origin rule fetches twice: which positions go decides which rows are drawn.
    rounds = 2 if fields.get("alg") == "origin" else 1
    assert h.transfers - transfers <= rounds * (h.engine.steps - steps)
    assert h.transfers - transfers >= h.engine.steps - steps


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
        one = torch.zeros(1, 1, dtype=torch.long)
        return SimpleNamespace(pending=Forward(one, one, model=model), waited=waited)

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


def test_llada2_defaults_are_its_authors(engines: dict[str, Harness]) -> None:
    h = engines["llada2"]
    assert h.run(LLADA2[:2], max_tokens=40) == h.run(
        LLADA2[:2],
        max_tokens=40,
        decoding="reference",
        threshold=0.95,
        block_length=32,
        diffusion_steps=32,
        cache="prefix",
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"decoding": "reference", "block_length": 8, "threshold": 0.6},
        {"decoding": "editing", "block_length": 8, "threshold": 0.7, "editing_threshold": 0.4},
        {"decoding": "reference", "block_length": 8, "temperature": 0.8, "seed": 5, "top_k": 20},
        {"decoding": "editing", "block_length": 16, "temperature": 0.7, "seed": 9, "top_p": 0.9},
    ],
)
def test_llada2_block_cache_gives_the_tokens_of_no_cache(
    engines: dict[str, Harness], fields: dict[str, Any]
) -> None:
    h = engines["llada2"]
    cached = h.run(LLADA2[:3], **fields)
    assert cached == h.run(LLADA2[:3], **fields, cache="none")
    assert any(len(t) > 8 for t in cached)  # more than one block decoded


def test_llada2_blocks_of_other_lengths_share_calls(engines: dict[str, Harness]) -> None:
    h = engines["llada2"]
    variants = [
        {"decoding": "reference", "block_length": 4},
        {"decoding": "reference", "block_length": 8, "threshold": 0.5},
        {"decoding": "editing", "block_length": 8},
        {"decoding": "editing", "block_length": 6, "num_to_transfer": 2},
    ]
    alone = [h.run([LLADA2[i]], **v)[0] for i, v in enumerate(variants)]
    runner = h.engine.runner
    calls, rows = runner.calls, runner.rows
    assert h.run_each([(LLADA2[i], v) for i, v in enumerate(variants)]) == alone
    assert (runner.rows - rows) / (runner.calls - calls) > 1.5

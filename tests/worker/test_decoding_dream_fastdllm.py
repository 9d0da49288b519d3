"""Fast-dLLM's Dream path (confidence_threshold, caches none/prefix/dual) against the
reference's outputs and pass counts, without a server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.worker.drive import drive
from vdiff_worker.decoding import strategy_for
from vdiff_worker.decoding.base import Context, ParamError, Settings
from vdiff_worker.decoding.dream_fastdllm import DreamThreshold
from vdiff_worker.models import load_model

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
FIXTURE = json.loads((GOLDEN / "cases" / "shared_dream_fastdllm.json").read_text())
MASK = FIXTURE["mask_token_id"]


@pytest.fixture(scope="module")
def dream() -> torch.nn.Module:
    return load_model(str(GOLDEN / "dream-tiny")).model


def case_id(case: dict[str, Any]) -> str:
    p = case["params"]
    return (
        f"{case['cache']}-{p['max_new_tokens']}/{p['block_length']}/{p['threshold']}-"
        f"{case['task']}-P{len(case['prompt_ids'])}"
    )


def settings(**kw: Any) -> Settings:
    base: dict[str, Any] = dict(
        gen_length=32, steps=4, block_length=8, temperature=0.0, threshold=0.9
    )
    return Settings(**{**base, **kw})


def run_case(model: torch.nn.Module, case: dict[str, Any]) -> tuple[list[int], int]:
    p = case["params"]
    s = settings(
        gen_length=p["max_new_tokens"],
        steps=p["steps"],
        block_length=p["block_length"],
        threshold=p["threshold"],
        top_p=p["top_p"] if p["top_p"] is not None else 1.0,
        top_k=p["top_k"],
        cache=case["cache"],
    )
    DreamThreshold.check(s)
    ctx = Context(
        prompt=torch.tensor(case["prompt_ids"]),
        settings=s,
        mask_id=MASK,
        generator=torch.Generator(),
    )
    rows = drive(strategy_for("dream", "threshold")(ctx), {"main": model})
    return ctx.canvas.tolist(), rows


@pytest.mark.parametrize("case", FIXTURE["fastdllm"], ids=case_id)
def test_reference_tokens_within_its_passes(dream: torch.nn.Module, case: dict[str, Any]) -> None:
    canvas, rows = run_case(dream, case)
    assert canvas == case["output_ids"]
    assert rows <= case["nfe"]


@pytest.mark.parametrize("case", FIXTURE["fastdllm_topk50_default"][::9], ids=case_id)
def test_a_set_top_k_filters_as_dream_does(dream: torch.nn.Module, case: dict[str, Any]) -> None:
    canvas, rows = run_case(dream, case)
    assert canvas == case["output_ids"]
    assert rows <= case["nfe"]


def test_default_steps_follow_the_eval() -> None:
    assert DreamThreshold.default_steps(32, 8) == 4
    assert DreamThreshold.default_steps(48, 16) == 3
    assert DreamThreshold.default_steps(8, 32) == 1


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_max_parallel_caps_each_pass(dream: torch.nn.Module, cache: str) -> None:
    case = FIXTURE["fastdllm"][0]
    s = settings(threshold=0.0, cache=cache, max_parallel=2)  # the rule alone takes all
    ctx = Context(
        prompt=torch.tensor(case["prompt_ids"]),
        settings=s,
        mask_id=MASK,
        generator=torch.Generator(),
    )
    per_pass: list[int] = []
    drive(strategy_for("dream", "threshold")(ctx), {"main": dream}, per_pass)
    assert max(per_pass) == 2
    assert bool((ctx.canvas != MASK).all())


def test_uneven_steps_and_blocks_still_fill_the_canvas(dream: torch.nn.Module) -> None:
    prompt = torch.tensor(FIXTURE["fastdllm"][0]["prompt_ids"])
    for cache in ("none", "prefix", "dual"):
        s = settings(gen_length=20, steps=3, block_length=8, cache=cache)
        ctx = Context(prompt=prompt, settings=s, mask_id=MASK, generator=torch.Generator())
        drive(strategy_for("dream", "threshold")(ctx), {"main": dream})
        assert bool((ctx.canvas != MASK).all())


@pytest.mark.parametrize(
    "field,kw",
    [
        ("cache", {"cache": "paged"}),
        ("threshold", {"threshold": None}),
        ("cfg_scale", {"cfg_scale": 1.0}),
        ("remasking", {"remasking": "random"}),
        ("top_p", {"top_p": 0.0}),
    ],
)
def test_refusals_name_the_field(field: str, kw: dict[str, Any]) -> None:
    with pytest.raises(ParamError) as err:
        strategy_for("dream", "threshold").check(settings(**kw))
    assert err.value.param == field

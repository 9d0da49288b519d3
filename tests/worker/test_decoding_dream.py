"""Dream's reference sampler: filters, confidences, schedule and refusals, without a server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.worker.test_decoding_fastdllm import drive
from vdiff_worker.decoding import strategy_for
from vdiff_worker.decoding.base import Context, ParamError, Settings
from vdiff_worker.decoding.dream import filter_logits, sample_tokens
from vdiff_worker.models import load_model

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
LOW = torch.finfo(torch.float32).min


def settings(**kw: object) -> Settings:
    base: dict[str, object] = dict(gen_length=32, steps=32, block_length=32, temperature=0.0)
    return Settings(**{**base, **kw})  # type: ignore[arg-type]


def test_top_p_keeps_the_token_that_crosses_it() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, 0.0, 0.7, -1) > LOW
    assert kept.tolist() == [[True, True, False, False]]


def test_top_k_and_temperature() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    out = filter_logits(logits, 2.0, 1.0, 2)
    assert out[0, 1:3].tolist() == [1.5, 1.0] and bool((out[0, [0, 3]] == LOW).all())


def test_confidences_by_alg() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25]]))
    s = settings()
    gen = torch.Generator()
    conf, x0 = sample_tokens(logits, s, gen)
    assert x0.tolist() == [0, 0] and conf.tolist() == pytest.approx([0.6, 0.4])
    margin, _ = sample_tokens(logits, s, gen, "topk_margin")
    assert margin.tolist() == pytest.approx([0.3, 0.05])
    neg_entropy, _ = sample_tokens(logits, s, gen, "entropy")
    assert float(neg_entropy[0]) > float(neg_entropy[1])  # the peaked row is more confident


def test_passes_that_would_commit_nothing_are_not_made() -> None:
    dream = load_model(str(GOLDEN / "dream-tiny"))
    case = json.loads((GOLDEN / "cases" / "shared_dream.json").read_text())["generate"][0]
    ctx = Context(
        prompt=torch.tensor(case["prompt_ids"]),
        settings=settings(alg="entropy"),
        mask_id=484,
        generator=torch.Generator(),
    )
    # linspace(1, eps, 33): the first step's share of 32 masks truncates to 0 tokens.
    assert drive(strategy_for("dream", "reference")(ctx), {"main": dream.model}) == 31
    assert bool((ctx.canvas != 484).all())


@pytest.mark.parametrize(
    "field,kw",
    [
        ("alg", {"alg": "leftright"}),
        ("alg_temp", {"alg_temp": -1.0}),
        ("cache", {"cache": "prefix"}),
    ],
)
def test_refusals_name_the_field(field: str, kw: dict[str, object]) -> None:
    with pytest.raises(ParamError) as err:
        strategy_for("dream", "reference").check(settings(**kw))
    assert err.value.param == field

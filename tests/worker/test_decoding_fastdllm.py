"""Fast-dLLM's transfer rules, the per-pass cap and the refusals, without a server."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.worker.drive import drive
from vdiff_worker.decoding import strategy_for
from vdiff_worker.decoding.base import (
    Among,
    Context,
    ParamError,
    Settings,
    draw,
    gumbel_argmax,
)
from vdiff_worker.decoding.fastdllm import factor_rule, threshold_rule
from vdiff_worker.models import LoadedModel, load_model
from vdiff_worker.models.base import ModelOutput
from vdiff_worker.runner import Call, Runner

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
INF = float("inf")


@pytest.fixture(scope="module")
def llada() -> LoadedModel:
    return load_model(str(GOLDEN / "llada-tiny"))


def conf(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_threshold_rule_takes_the_best_and_all_above() -> None:
    rule = threshold_rule(0.9)
    assert rule(conf(-INF, 0.5, 0.95, 0.9, 0.2), 0).tolist() == [2, 3]
    assert rule(conf(0.1, 0.3, -INF), 0).tolist() == [1]  # none clears it: the best still goes


def test_factor_rule_follows_the_reference_count() -> None:
    rule = factor_rule(1.0)  # bars: -1, 1 - 1/3, 1 - 1/4, 1 - 1/5, ...
    assert rule(conf(0.7, 0.5, 0.9, 0.1, -INF), 0).tolist() == [2, 0]
    assert rule(conf(0.2, -INF), 0).tolist() == [0]
    # The scan stopping at the last position takes them all, as the reference does.
    assert sorted(rule(conf(0.95, 0.9, 0.1), 0).tolist()) == [0, 1, 2]


def settings(**kw: object) -> Settings:
    base: dict[str, object] = dict(gen_length=32, steps=32, block_length=8, temperature=0.0)
    return Settings(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_max_parallel_caps_tokens_per_pass(llada: LoadedModel, cache: str) -> None:
    s = settings(threshold=0.0, cache=cache, max_parallel=2)  # the rule alone would take all
    prompt = torch.tensor(llada.tokenizer.encode("What is 24 + 1?"))
    ctx = Context(prompt=prompt, settings=s, mask_id=482, generator=torch.Generator())
    per_pass: list[int] = []
    rows = drive(strategy_for("llada", "threshold")(ctx), {"main": llada.model}, per_pass)
    assert max(per_pass) == 2 and rows == 16
    assert bool((ctx.canvas != 482).all())


@pytest.mark.parametrize(
    "decoding,field,kw",
    [
        ("threshold", "cfg_scale", {"cfg_scale": 1.0}),
        ("reference", "cfg_scale", {"cache": "dual", "cfg_scale": 2.0}),
        ("threshold", "cache", {"cache": "paged"}),
    ],
)
def test_refusals_name_the_field(decoding: str, field: str, kw: dict[str, object]) -> None:
    with pytest.raises(ParamError) as err:
        strategy_for("llada", decoding).check(settings(**kw))
    assert err.value.param == field


def test_llada_only_strategies_are_not_offered_for_dream() -> None:
    with pytest.raises(ParamError, match="available"):
        strategy_for("dream", "factor")
    assert strategy_for("dream", "threshold") is not strategy_for("llada", "threshold")


def test_top_k_filters_before_the_gumbel_noise() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0]])
    picked = {
        int(gumbel_argmax(logits, 50.0, torch.Generator().manual_seed(s), top_k=2))
        for s in range(40)
    }
    assert picked == {1, 2}  # a high temperature reaches both kept tokens, never the others
    nucleus = {
        int(gumbel_argmax(logits, 50.0, torch.Generator().manual_seed(s), top_p=0.5))
        for s in range(40)
    }
    assert nucleus == {1}


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_passes_read_logits_at_the_masks_of_their_span_only(
    llada: LoadedModel, cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = torch.tensor(llada.tokenizer.encode("What is 24 + 1?"))
    s = settings(threshold=0.9, cache=cache, temperature=0.7)
    ctx = Context(prompt=prompt, settings=s, mask_id=482, generator=torch.Generator())
    seen: list[tuple[list[int], list[int]]] = []
    run = Runner.run

    def spy(self: Runner, calls: list[Call]) -> list[ModelOutput]:
        for c in calls:
            f = c.forward
            lo, hi = f.span
            masked = lo + (f.input_ids[0, lo:hi] == 482).nonzero()[:, 0]
            assert f.picks is not None
            seen.append((f.picks.tolist(), masked.tolist()))
        return run(self, calls)

    monkeypatch.setattr(Runner, "run", spy)
    drive(strategy_for("llada", "threshold")(ctx), {"main": llada.model})
    assert bool((ctx.canvas != 482).all()) and len(seen) >= 4
    for picks, masked in seen:
        assert picks == masked and picks


def test_noise_for_some_rows_is_that_of_the_whole_span() -> None:
    """A pass that read only some positions draws the same noise for them as one that read
    all: the same tokens at temperature > 0, whichever positions a pass reads."""
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    rows = torch.tensor([1, 4, 5])
    every = gumbel_argmax(logits, 0.8, torch.Generator().manual_seed(7))
    some = gumbel_argmax(logits[rows], 0.8, torch.Generator().manual_seed(7), among=Among(rows, 8))
    assert torch.equal(some, every[rows])
    assert torch.equal(
        draw(Among(rows, 8), torch.Size([3]), torch.Generator().manual_seed(2), torch.float64),
        torch.rand(8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)[rows],
    )

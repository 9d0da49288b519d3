"""Admission: each request field reaches the resolved settings, over the server's defaults."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any, cast

from tests.api.test_requests import EXAMPLES
from vdiff_common.protocol import SamplingParams
from vdiff_worker.admission import RENAMED, Admission, Defaults
from vdiff_worker.decoding.base import UNIVERSAL, Settings
from vdiff_worker.decoding.fastdllm import Threshold
from vdiff_worker.decoding.llada2 import LLaDA2Reference
from vdiff_worker.models.loader import LoadedModel


def admission(kind: str, defaults: Defaults | None = None) -> Admission:
    loaded = cast(LoadedModel, SimpleNamespace(kind=kind))  # settings() reads the kind only
    return Admission(loaded, defaults or Defaults(), frozenset({"main"}))


def test_every_request_field_is_universal_or_a_setting() -> None:
    # A field added to SamplingParams and to Settings under its name needs nothing else.
    settings = {f.name for f in dataclasses.fields(Settings)}
    for name in SamplingParams.__struct_fields__:
        assert name in UNIVERSAL or RENAMED.get(name, name) in settings, name


def test_every_field_a_request_sets_is_the_setting() -> None:
    fields = {k: v for k, v in EXAMPLES.items() if k not in UNIVERSAL}
    s = admission("llada").settings(SamplingParams(**fields), Threshold, "prefix")
    for name, value in fields.items():
        assert getattr(s, RENAMED.get(name, name)) == value, name


def test_server_defaults_then_the_strategy_and_kind_fill_the_rest() -> None:
    d = Defaults(max_tokens=48, diffusion_steps=12, block_length=16, remasking="random")
    s = admission("llada", d).settings(SamplingParams(), Threshold, "none")
    assert (s.gen_length, s.steps, s.block_length, s.remasking) == (48, 12, 16, "random")
    assert (s.threshold, s.temperature, s.factor) == (0.9, 0.0, 1.0)
    # LLaDA2: 0.95, blocks not cut to the canvas, one step per token of a block.
    p = SamplingParams(max_tokens=8)
    s2 = admission("llada2").settings(p, LLaDA2Reference, "prefix")
    assert (s2.threshold, s2.block_length, s2.steps, s2.cache) == (0.95, 32, 8, "prefix")
    s3 = admission("llada").settings(p, Threshold, "dual")
    assert (s3.block_length, s3.steps) == (8, 8)


def test_a_request_beats_the_server_and_the_server_the_kind() -> None:
    over: dict[str, Any] = {"threshold": 0.7}
    s = admission("llada2", Defaults(threshold=0.8)).settings(
        SamplingParams(**over), LLaDA2Reference, "prefix"
    )
    assert s.threshold == 0.7
    s = admission("llada2", Defaults(threshold=0.8)).settings(
        SamplingParams(), LLaDA2Reference, "prefix"
    )
    assert s.threshold == 0.8

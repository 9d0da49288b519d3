"""The gateway's translation: every SamplingParams field is an HTTP field, with its bounds, and
reaches the worker's job as it was sent."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from vdiff_api.requests import plan
from vdiff_api.schemas import ChatCompletionRequest, CompletionRequest
from vdiff_common.protocol import Generate, ModelInfo, SamplingParams

# For each field, a valid value unlike its default.
EXAMPLES: dict[str, Any] = {
    "max_tokens": 64,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 20,
    "seed": 11,
    "stop": ["\n\n"],
    "stop_token_ids": [7],
    "decoding": "factor",
    "diffusion_steps": 32,
    "block_length": 16,
    "remasking": "random",
    "threshold": 0.8,
    "factor": 2.0,
    "cache": "prefix",
    "cfg_scale": 1.5,
    "alg": "maskgit_plus",
    "alg_temp": 0.2,
    "apd_mixture_weight": 0.5,
    "apd_kv_window": 8,
    "apd_max_lookahead": 12,
    "editing_threshold": 0.6,
    "max_post_steps": 4,
    "num_to_transfer": 2,
    "eos_early_stop": False,
}
SPELLED = {"stop", "stop_token_ids"}  # HTTP also takes one stop string, and None for both


def test_the_examples_cover_every_field() -> None:
    assert set(EXAMPLES) == set(SamplingParams.__struct_fields__)
    neutral = SamplingParams()
    assert all(getattr(neutral, k) != v for k, v in EXAMPLES.items())


@pytest.mark.parametrize("schema", [CompletionRequest, ChatCompletionRequest])
def test_every_field_is_a_request_field_with_its_bounds(schema: type[msgspec.Struct]) -> None:
    http = {f.name: f for f in msgspec.structs.fields(schema)}
    for f in msgspec.structs.fields(SamplingParams):
        assert f.name in http, f.name
        if f.name not in SPELLED:
            assert (http[f.name].type, http[f.name].default) == (f.type, f.default), f.name


def _job(body: dict[str, Any], schema: type[CompletionRequest | ChatCompletionRequest]) -> Generate:
    req = msgspec.json.decode(msgspec.json.encode(body), type=schema)
    (job,) = plan(req, "r1", ModelInfo(name="m", max_model_len=4096)).jobs
    # As the worker will read it, off the wire.
    return msgspec.msgpack.decode(msgspec.msgpack.encode(job), type=Generate)


def test_every_field_reaches_the_job() -> None:
    completion = _job({"prompt": "hi", **EXAMPLES}, CompletionRequest)
    chat = _job(
        {"messages": [{"role": "user", "content": "hi"}], **EXAMPLES}, ChatCompletionRequest
    )
    for job in (completion, chat):
        assert {k: getattr(job.params, k) for k in EXAMPLES} == EXAMPLES


@pytest.mark.parametrize(
    ("field", "bad"),
    [("threshold", 1.5), ("diffusion_steps", 0), ("cache", "paged"), ("top_p", 0.0)],
)
def test_the_bounds_hold_over_http_and_on_the_wire(field: str, bad: Any) -> None:
    with pytest.raises(msgspec.ValidationError, match=field):
        msgspec.json.decode(
            msgspec.json.encode({"prompt": "hi", field: bad}), type=CompletionRequest
        )
    with pytest.raises(msgspec.ValidationError, match=field):
        msgspec.msgpack.decode(msgspec.msgpack.encode({field: bad}), type=SamplingParams)

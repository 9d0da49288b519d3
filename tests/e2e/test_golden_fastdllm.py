"""Token-exact parity with Fast-dLLM (threshold, factor, fixed steps; no, prefix and dual
cache) through the running server, in no more forward passes than the reference made."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import GOLDEN, Server
from tests.e2e.test_golden_llada import answer

CASES = json.loads((GOLDEN / "cases" / "shared_llada.json").read_text())["fastdllm"]


def body(case: dict) -> dict[str, object]:
    p = case["params"]
    out: dict[str, object] = {
        "model": "llada-tiny",
        "prompt": case["prompt_ids"],
        "max_tokens": p["gen_length"],
        "block_length": p["block_length"],
        "remasking": p["remasking"],
        "temperature": p["temperature"],
        "cache": case["cache"],
        "return_token_ids": True,
    }
    if "factor" in p:
        out.update(decoding="factor", factor=p["factor"])
    elif p["threshold"] is not None:
        out.update(decoding="threshold", threshold=p["threshold"])
    else:
        # Fast-dLLM's threshold=None: LLaDA's fixed schedule, the only rule that reads steps.
        out.update(decoding="reference", diffusion_steps=p["steps"])
    return out


def label(case: dict) -> str:
    p = case["params"]
    rule = f"factor={p['factor']}" if "factor" in p else f"threshold={p['threshold']}"
    return f"{case['cache']}-{rule}-L{p['gen_length']}-B{p['block_length']}-{case['task']}"


@pytest.mark.parametrize("case", CASES, ids=label)
def test_fastdllm_case(llada_server: Server, case: dict) -> None:
    r = httpx.post(llada_server.url + "/completions", json=body(case), timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["token_ids"] == answer(case["output_ids"])
    assert out["usage"]["forward_passes"] <= case["nfe"]


@pytest.mark.parametrize("field,value", [("cache", "dual"), ("decoding", "threshold")])
def test_cfg_is_refused_with_a_cache_or_fast_rule(
    llada_server: Server, field: str, value: str
) -> None:
    req = {"model": "llada-tiny", "prompt": "hi", "max_tokens": 8, "cfg_scale": 1.0, field: value}
    r = httpx.post(llada_server.url + "/completions", json=req, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "cfg_scale"


def test_fields_a_strategy_does_not_read_are_refused(llada_server: Server) -> None:
    case = CASES[0]
    for extra, field in (
        ({"decoding": "threshold", "diffusion_steps": 32}, "diffusion_steps"),
        ({"decoding": "factor", "factor": 1.0, "threshold": 0.9}, "threshold"),
        ({"decoding": "threshold", "alg": "entropy"}, "alg"),
    ):
        r = httpx.post(
            llada_server.url + "/completions",
            timeout=60,
            json={"model": "llada-tiny", "prompt": case["prompt_ids"], "max_tokens": 32, **extra},
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == field

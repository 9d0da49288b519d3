"""Token-exact parity with Dream's `diffusion_generate` through the running server."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import GOLDEN, Server, start_allinone

CASES = json.loads((GOLDEN / "cases" / "shared_dream.json").read_text())
FAST = json.loads((GOLDEN / "cases" / "shared_dream_fastdllm.json").read_text())["fastdllm"]
STOP = {CASES["eos_token_id"], 482}  # <|endoftext|>, <|im_end|>


def answer(ids: list[int]) -> list[int]:
    """Tokens up to the first end-of-text or end-of-turn token."""
    for i, t in enumerate(ids):
        if t in STOP:
            return ids[:i]
    return ids


@pytest.fixture(scope="module")
def dream_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_allinone(tmp_path_factory.mktemp("dream"), "--model", str(GOLDEN / "dream-tiny"))
    yield server
    for p in server.procs:
        p.stop()


def body(
    prompt: list[int] | list[list[int]], params: dict[str, object], **extra: object
) -> dict[str, object]:
    return {
        "model": "dream-tiny",
        "prompt": prompt,
        "max_tokens": params["max_new_tokens"],
        "diffusion_steps": params["steps"],
        "alg": params["alg"],
        "temperature": params["temperature"],
        "return_token_ids": True,
        **extra,
    }


SINGLE = [c for c in CASES["generate"] if "prompt_ids" in c]
BATCH = [c for c in CASES["generate"] if "batch_prompt_ids" in c]


@pytest.mark.parametrize(
    "case", SINGLE, ids=lambda c: "{alg}-{steps}-".format(**c["params"]) + c["task"]
)
def test_generate_case(dream_server: Server, case: dict) -> None:
    r = httpx.post(
        dream_server.url + "/completions",
        json=body(case["prompt_ids"], case["params"]),
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == answer(case["output_ids"])


def test_generate_left_padded_batch(dream_server: Server) -> None:
    case = BATCH[0]
    r = httpx.post(
        dream_server.url + "/completions",
        json=body(case["batch_prompt_ids"], case["params"]),
        timeout=120,
    )
    assert r.status_code == 200, r.text
    got = [c["token_ids"] for c in r.json()["choices"]]
    assert got == [answer(o) for o in case["output_ids"]]


@pytest.mark.parametrize(
    "extra",
    [
        {"alg": "origin", "temperature": 0.8, "top_p": 0.9},
        {"alg": "entropy", "temperature": 0.7, "top_k": 20, "alg_temp": 0.5},
    ],
)
def test_sampled_generation_repeats_with_a_seed(
    dream_server: Server, extra: dict[str, object]
) -> None:
    case = SINGLE[0]
    req = body(case["prompt_ids"], case["params"], seed=7, **extra)
    first, again = (
        httpx.post(dream_server.url + "/completions", json=req, timeout=120) for _ in range(2)
    )
    assert first.status_code == 200, first.text
    assert first.json()["choices"][0]["token_ids"] == again.json()["choices"][0]["token_ids"]


@pytest.mark.parametrize(
    "case",
    FAST,
    ids=lambda c: "{cache}-{max_new_tokens}-".format(cache=c["cache"], **c["params"]) + c["task"],
)
def test_fastdllm_dream_path_case(dream_server: Server, case: dict) -> None:
    p = case["params"]
    req = {
        "model": "dream-tiny",
        "prompt": case["prompt_ids"],
        "max_tokens": p["max_new_tokens"],
        "block_length": p["block_length"],
        "threshold": p["threshold"],
        "cache": case["cache"],
        "temperature": 0.0,
        "return_token_ids": True,
        "eos_early_stop": False,
    }
    if case["cache"] == "none":  # only there do the steps matter, and only as the reference's
        req |= {"decoding": "threshold", "diffusion_steps": p["steps"]}
    r = httpx.post(dream_server.url + "/completions", json=req, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == answer(case["output_ids"])
    assert r.json()["usage"]["forward_passes"] <= case["nfe"]


@pytest.mark.parametrize(
    "field,value", [("cfg_scale", 1.0), ("remasking", "random"), ("cache", "dual")]
)
def test_fields_dream_cannot_honour_are_refused(
    dream_server: Server, field: str, value: object
) -> None:
    req = {
        "model": "dream-tiny",
        "prompt": "hi",
        "max_tokens": 8,
        "decoding": "reference",
        field: value,
    }
    r = httpx.post(dream_server.url + "/completions", json=req, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field

"""Token-exact parity with LLaDA's reference `generate` through the running server."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.conftest import GOLDEN, Server, start_allinone

CASES = json.loads((GOLDEN / "cases" / "shared_llada.json").read_text())
STOP = {CASES["eos_token_id"], 485}  # <|endoftext|>, <|eot_id|>


def answer(ids: list[int]) -> list[int]:
    """Reference tokens up to the first end-of-text or end-of-turn token."""
    for i, t in enumerate(ids):
        if t in STOP:
            return ids[:i]
    return ids


def body(prompt: list[int] | list[list[int]], params: dict[str, object]) -> dict[str, object]:
    out: dict[str, object] = {
        "model": "llada-tiny",
        "prompt": prompt,
        "max_tokens": params["gen_length"],
        "diffusion_steps": params["steps"],
        "block_length": params["block_length"],
        "remasking": params["remasking"],
        "temperature": params["temperature"],
        "return_token_ids": True,
    }
    if "cfg_scale" in params:
        out["cfg_scale"] = params["cfg_scale"]
    return out


SINGLE = [c for c in CASES["generate"] if "prompt_ids" in c]
BATCH = [c for c in CASES["generate"] if "batch_prompt_ids" in c]


@pytest.mark.parametrize("case", SINGLE, ids=lambda c: json.dumps(c["params"]) + c["task"])
def test_generate_case(llada_server: Server, case: dict) -> None:
    r = httpx.post(
        llada_server.url + "/completions",
        json=body(case["prompt_ids"], case["params"]),
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == answer(case["output_ids"])


def test_generate_left_padded_batch(llada_server: Server) -> None:
    case = BATCH[0]
    r = httpx.post(
        llada_server.url + "/completions",
        json=body(case["batch_prompt_ids"], case["params"]),
        timeout=120,
    )
    assert r.status_code == 200, r.text
    got = [c["token_ids"] for c in r.json()["choices"]]
    assert got == [answer(o) for o in case["output_ids"]]


BY_FLAGS = {"gen_length": 48, "steps": 24, "temperature": 0.0, "remasking": "low_confidence"}


def test_server_defaults_from_flags_give_the_reference_tokens(tmp_path: Path) -> None:
    # A request that sets nothing but its prompt gets the server's defaults: the JSON's, under
    # the named flag, re-emitted by the all-in-one launcher to its worker.
    over = {"decoding": "reference", "max_tokens": 48, "diffusion_steps": 24, "block_length": 8}
    server = start_allinone(
        tmp_path,
        *("--model", str(GOLDEN / "llada-tiny"), "--block-size", "16"),
        *("--override-generation-config", json.dumps(over)),
    )
    cases = [c for c in SINGLE if c["params"] == {**BY_FLAGS, "block_length": 16}]
    assert len(cases) == 8
    try:
        for case in cases:
            r = httpx.post(
                server.url + "/completions",
                json={
                    "model": "llada-tiny",
                    "prompt": case["prompt_ids"],
                    "return_token_ids": True,
                },
                timeout=120,
            )
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["token_ids"] == answer(case["output_ids"])
    finally:
        for p in server.procs:
            p.stop()

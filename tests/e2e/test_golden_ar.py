"""The autoregressive fallback through the server matches transformers' greedy generate."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import GOLDEN, Server, start_allinone

CASES = json.loads((GOLDEN / "cases" / "shared_apd.json").read_text())["ar_greedy"]
STOP = {480, 482}  # <|endoftext|>, <|im_end|>


@pytest.fixture(scope="module")
def ar_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_allinone(tmp_path_factory.mktemp("ar"), "--model", str(GOLDEN / "ar-tiny"))
    yield s
    for p in s.procs:
        p.stop()


def _answer(ids: list[int]) -> list[int]:
    return ids[: next((i for i, t in enumerate(ids) if t in STOP), len(ids))]


@pytest.mark.parametrize("case", CASES, ids=lambda c: str(len(c["prompt_ids"])))
def test_ar_greedy_case(ar_server: Server, case: dict) -> None:
    r = httpx.post(
        ar_server.url + "/completions",
        timeout=60,
        json={
            "model": "ar-tiny",
            "prompt": case["prompt_ids"],
            "max_tokens": case["max_new_tokens"],
            "temperature": 0,
            "return_token_ids": True,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["token_ids"] == _answer(case["output_ids"])
    # One pass per token up to and including the end token (the prompt's pass yields the first).
    want = min(len(_answer(case["output_ids"])) + 1, case["max_new_tokens"])
    assert body["usage"]["forward_passes"] == want


def test_ar_sampling_is_seeded(ar_server: Server) -> None:
    body = {
        "model": "ar-tiny",
        "prompt": "What is 2 + 3?",
        "max_tokens": 12,
        "temperature": 1.0,
        "top_p": 0.9,
        "top_k": 20,
        "seed": 3,
        "return_token_ids": True,
    }
    a = httpx.post(ar_server.url + "/completions", json=body, timeout=60).json()
    b = httpx.post(ar_server.url + "/completions", json=body, timeout=60).json()
    assert a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"]

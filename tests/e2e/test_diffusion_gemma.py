"""DiffusionGemma served through transformers' own block-diffusion generate, end to end."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import Server, start_allinone
from tests.worker.test_models_diffusion_gemma import build_checkpoint
from vdiff_worker.models import load_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("dg") / "diffusion-gemma-tiny")


@pytest.fixture(scope="module")
def server(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_allinone(tmp_path_factory.mktemp("dg-server"), "--model", str(model))
    yield s
    assert s.procs[0].stop() == 0


def test_chat_through_the_server(server: Server) -> None:
    assert [m["id"] for m in httpx.get(server.url + "/models").json()["data"]] == [
        "diffusion-gemma-tiny"
    ]
    r = httpx.post(
        server.url + "/chat/completions",
        timeout=120,
        json={
            "messages": [{"role": "user", "content": "What is 2 + 3?"}],
            "max_tokens": 8,
            "return_token_ids": True,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert 0 < body["usage"]["completion_tokens"] <= 8
    assert body["usage"]["forward_passes"] == 1  # one generate call
    assert len(body["choices"][0]["token_ids"]) <= 8
    r = httpx.post(
        server.url + "/completions",
        timeout=60,
        json={"prompt": "hi", "max_tokens": 8, "temperature": 0.7},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_the_servers_tokens_are_transformers_generate(model: Path, server: Server) -> None:
    # The same seeded checkpoint in this process: generate seeded as the worker seeds it, over
    # more than one 8-token canvas; the server's answer (cut at the first stop token, as the
    # server cuts it) must be those tokens, streamed or not.
    local = load_model(str(model))
    prompt = local.tokenizer.encode("What is 2 + 3?")

    def reference(seed: int, n: int = 20) -> list[int]:
        torch.manual_seed(seed)
        with torch.no_grad():
            out = local.model.generate(torch.tensor([prompt]), max_new_tokens=n)
        tokens = out.sequences[0, len(prompt) :][:n].tolist()
        stops = [i for i, t in enumerate(tokens) if t in local.tokenizer.stop_token_ids]
        return tokens[: stops[0]] if stops else tokens

    body = {"prompt": prompt, "max_tokens": 20, "return_token_ids": True, "seed": 5}
    r = httpx.post(server.url + "/completions", timeout=120, json={**body, "n": 2})
    assert r.status_code == 200, r.text
    got = [c["token_ids"] for c in r.json()["choices"]]
    assert got == [reference(5), reference(6)] and got[0] != got[1]
    streamed: list[int] = []
    with httpx.stream(
        "POST", server.url + "/completions", timeout=120, json={**body, "stream": True}
    ) as events:
        for line in events.iter_lines():
            if line.startswith("data: {"):
                streamed += json.loads(line[6:])["choices"][0].get("token_ids", [])
    assert streamed == reference(5)

"""DiffusionGemma served through transformers' own block-diffusion generate, end to end."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import start_allinone
from tests.worker.test_models_diffusion_gemma import build_checkpoint


def test_chat_through_the_server(tmp_path: Path) -> None:
    model = build_checkpoint(tmp_path / "diffusion-gemma-tiny")
    s = start_allinone(tmp_path, "--model", str(model))
    try:
        assert [m["id"] for m in httpx.get(s.url + "/models").json()["data"]] == [
            "diffusion-gemma-tiny"
        ]
        r = httpx.post(
            s.url + "/chat/completions",
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
            s.url + "/completions",
            timeout=60,
            json={"prompt": "hi", "max_tokens": 8, "temperature": 0.7},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    finally:
        assert s.procs[0].stop() == 0

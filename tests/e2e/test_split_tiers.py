"""`vdiff-api` and `vdiff-worker` started separately find each other and serve."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai

from tests.conftest import GOLDEN, free_port, spawn, wait_ready


def test_gateway_and_worker_started_separately(tmp_path: Path) -> None:
    port, zport = free_port(), free_port()
    zmq = f"tcp://127.0.0.1:{zport}"
    gateway = spawn(
        "vdiff_api.cli", ["--port", str(port), "--zmq-bind", zmq], tmp_path / "gateway.log"
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, [gateway], path="/health/live")
        # Ready stays false until a worker registers.
        assert httpx.get(base + "/health/ready").status_code == 503
        # No worker yet: nobody can say "m" does not exist, so it is 503 (retry), not 404.
        r = httpx.post(base + "/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        mport = free_port()
        worker = spawn(
            "vdiff_worker",
            [
                "--model",
                str(GOLDEN / "llada-tiny"),
                "--gateway",
                zmq,
                "--served-model-name",
                "tiny",
                "--num-threads",
                "1",
                "--metrics-port",
                str(mport),
                "--metrics-host",
                "127.0.0.1",
            ],
            tmp_path / "worker.log",
            env={"VDIFF_BLOCK_SIZE": "8"},
        )
        try:
            wait_ready(base, [gateway, worker])
            client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
            assert [m.id for m in client.models.list().data] == ["tiny"]
            out = client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "What is 24 + 1?"}],
                max_tokens=32,
            )
            assert out.choices[0].message.content
            text = httpx.get(f"http://127.0.0.1:{mport}/metrics").text
            assert 'vdiff_forward_passes_total{model_name="tiny",worker_id=' in text
            assert "vdiff_tokens_per_forward_bucket" in text
            assert "vdiff_host_memory_peak_bytes" in text
        finally:
            assert worker.stop() == 0
    finally:
        assert gateway.stop() == 0

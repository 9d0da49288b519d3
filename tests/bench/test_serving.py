"""bench.serving against a real server: it finds the model itself and reports every figure."""

from __future__ import annotations

import json
from pathlib import Path

from bench.serving import main
from tests.conftest import Server


def test_serving_benchmark_streaming_and_not(llada_server: Server, tmp_path: Path) -> None:
    for stream in ("--stream", "--no-stream"):
        out = tmp_path / f"serving{stream}.json"
        main(
            [
                "--base-url",
                llada_server.base,
                "--num-prompts",
                "12",
                "--concurrency",
                "4",
                "--max-tokens",
                "16",
                stream,
                "--output",
                str(out),
            ]
        )
        report = json.loads(out.read_text())
        assert report["model"] == "llada-tiny"
        assert report["requests"] == 12 and report["errors"] == {}
        assert report["requests_per_s"] > 0 and report["output_tokens_per_s"] > 0
        assert set(report["latency_s"]) == {"mean", "p50", "p90", "p95", "p99"}
        assert bool(report["ttfc_s"]) == (stream == "--stream")
        # Non-streaming responses carry Server-Timing: the gateway's own share is reported.
        assert bool(report["gateway_overhead_s"]) == (stream == "--no-stream")
        assert bool(report["transport_overhead_s"]) == (stream == "--no-stream")
        assert bool(report["outside_worker_s"]) == (stream == "--no-stream")


def test_poisson_arrivals(llada_server: Server, tmp_path: Path) -> None:
    out = tmp_path / "poisson.json"
    main(
        [
            "--base-url",
            llada_server.base,
            "--num-prompts",
            "6",
            "--request-rate",
            "20",
            "--max-tokens",
            "8",
            "--output",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert report["mode"].startswith("poisson") and report["errors"] == {}

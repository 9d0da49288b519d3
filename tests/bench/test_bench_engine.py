"""bench.engine: two modes through real servers, every figure reported, against the bound."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bench.common
from bench.engine import main

FIELDS = {
    "concurrency",
    "requests",
    "tokens",
    "completion_tokens",
    "seconds",
    "tokens_per_s",
    "completion_tokens_per_s",
    "latency_mean_s",
    "model_calls",
    "model_rows",
    "rows_per_call",
    "calls_per_request",
    "passes_per_request",
    "bound_tokens_per_s",
    "of_bound",
    "speedup",
}


def test_quick_run_reports_every_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)  # not over a real run's results
    main(["--quick", "--levels", "1,4", "--only", "llada-tiny/threshold+dual,dream-tiny/apd"])
    report = json.loads((tmp_path / "engine.json").read_text())
    assert report["max_tokens"] == 32 and report["requests_per_client"] == 1
    runs = {
        (model, label): res
        for model, modes in report["results"].items()
        for label, res in modes.items()
    }
    assert set(runs) == {("llada-tiny", "threshold+dual"), ("dream-tiny", "apd")}
    for res in runs.values():
        assert "error" not in res
        assert res["trace"]["passes_per_request"] >= 1 and res["trace"]["shapes"]
        levels = {lv["concurrency"]: lv for lv in res["levels"]}
        assert set(levels) == {1, 4}
        for c, lv in levels.items():
            assert FIELDS <= set(lv)
            assert lv["requests"] == c and lv["tokens"] == 32 * c
            assert lv["rows_per_call"] >= 1 and lv["tokens_per_s"] > 0
            assert lv["bound_tokens_per_s"] > 0 and lv["of_bound"] > 0
        # One sequence at a time: one row per call, and the calls are the replayed passes.
        assert levels[1]["rows_per_call"] == 1 and levels[1]["speedup"] == 1
        assert levels[1]["calls_per_request"] == levels[1]["passes_per_request"]
    # APD's verifier passes are replayed too.
    assert {s["model"] for s in runs[("dream-tiny", "apd")]["trace"]["shapes"]} == {
        "main",
        "verifier",
    }
    assert report["checks"] == []
    # The targets' levels (C=16, C=8) were not run: reported, as not measured.
    assert [t["value"] for t in report["targets"]] == [None, None, None]
    out = capsys.readouterr().out
    assert "of bound" in out and "(target >= 1.4): NOT met" in out
    assert (tmp_path / "engine.png").exists()

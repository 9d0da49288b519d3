"""bench/accuracy.py through a real server: every strategy answers every task kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bench.common
import bench.decoding
from bench.accuracy import STRATEGIES, main
from vdiff_worker.tiny.tasks import KINDS


def test_accuracy_bench_reports_every_strategy_and_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    monkeypatch.setattr(bench.decoding, "RESULTS", tmp_path)
    main(["--n-per-kind", "1"])
    report = json.loads((tmp_path / "accuracy.json").read_text())
    runs = report["results"]
    assert [label for label, _ in STRATEGIES] == list(runs)
    assert {"reference", "threshold+dual", "apd"} <= set(runs)
    for label, run in runs.items():
        assert "error" not in run, label
        assert set(run["per_task"]) == set(KINDS)
        assert 0.0 <= run["accuracy"] <= 1.0 and run["tokens_per_s"] > 0
    # Reference decoding commits one token per step over the 32-token canvas.
    assert runs["reference"]["tokens_per_forward"] == 1.0
    assert runs["threshold+dual"]["tokens_per_forward"] > 1.0
    assert (tmp_path / "accuracy.png").exists()

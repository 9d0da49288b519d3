"""bench.overhead: one worker behind both a real gateway and a bare Dispatcher, same answers."""

from __future__ import annotations

from bench.overhead import main


def test_both_paths_answer_alike_and_every_figure_is_reported() -> None:
    report = main(["--requests", "4"])  # raises if the paths answer differently or fail
    rows = {row["path"]: row for row in report["rows"]}
    assert set(rows) == {"direct", "http", "hop"}
    assert all(row["requests"] == 4 for row in rows.values())
    # Both generation paths ran on the worker; the hop never reaches it.
    assert rows["direct"]["worker p50 ms"] > 0 and rows["http"]["worker p50 ms"] > 0
    assert rows["hop"]["worker p50 ms"] == 0
    assert report["gateway_ms"]["p50"] > 0 and report["hop_ms"]["p50"] > 0
    assert set(report["added_ms"]) == {"p50", "p90"}
    assert report["latency_ratio_http_to_direct"] > 0

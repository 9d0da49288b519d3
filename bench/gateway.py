"""The gateway's own time per request, on each event loop, in one run.

    .venv/bin/python bench/gateway.py [--num-prompts 300] [--rounds 2]

For each event loop (asyncio, uvloop) an all-in-one server (LLaDA-tiny, one worker thread)
takes ``--num-prompts`` non-streaming completions at concurrency 1 with ``max_tokens`` 8 from
vdiff-bench; the gateway's time is what its Server-Timing header reports (HTTP in to response
out, less the worker's own time, so ZeroMQ both ways is included). Rounds alternate the loops,
so load from elsewhere on the machine falls on both alike; the table gives the median over
rounds of each percentile, and the ratio of each loop's p50 to asyncio's.

Writes bench/results/gateway.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.common import GOLDEN, start_allinone, table, write_json
from bench.serving import build_parser, run

LOOPS = ("asyncio", "uvloop")
PCTS = ("p50", "p90", "p99")


def one_round(tmp: Path, loop: str, num_prompts: int) -> dict[str, float]:
    server = start_allinone(tmp, "--model", str(GOLDEN / "llada-tiny"), "--event-loop", loop)
    try:
        args = build_parser().parse_args([
            "--base-url", server.base, "--num-prompts", str(num_prompts), "--concurrency", "1",
            "--max-tokens", "8", "--no-stream"])
        report = asyncio.run(run(args))
    finally:
        server.procs[0].stop()
    if report.errors:
        raise RuntimeError(f"{loop}: errors {report.errors}")
    return {**report.gateway_overhead_s, "latency_p50": report.latency_s["p50"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    rounds: dict[str, list[dict[str, float]]] = {loop: [] for loop in LOOPS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for loop in LOOPS if r % 2 == 0 else reversed(LOOPS):
                rounds[loop].append(one_round(Path(tmp), loop, args.num_prompts))
    summary: dict[str, dict[str, Any]] = {
        loop: {k: statistics.median(x[k] for x in runs) for k in (*PCTS, "latency_p50")}
        for loop, runs in rounds.items()}
    base = summary["asyncio"]["p50"]
    rows = [{"loop": loop, **{f"gateway {k} ms": s[k] * 1000 for k in PCTS},
             "latency p50 ms": s["latency_p50"] * 1000, "p50 vs asyncio": s["p50"] / base}
            for loop, s in summary.items()]
    print()
    print(table(rows))
    path = write_json("gateway", {"num_prompts": args.num_prompts, "rounds": rounds,
                                  "median": summary})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

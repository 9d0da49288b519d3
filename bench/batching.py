"""Throughput of step-level batching through the real server at rising concurrency.

    .venv/bin/python bench/batching.py [--requests-per-stream 4] [--max-tokens 32]

Each of C concurrent streams sends requests back to back; every request decodes its whole
canvas (eos_early_stop off) so each does the same work. Tokens/s counts canvas tokens; the
speedup is against concurrency 1 measured in the same run. A second table varies --num-threads.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.common import GOLDEN, Server, plot, start_allinone, table, write_json

PROMPTS = [
    c["prompt_ids"]
    for c in json.loads((GOLDEN / "cases" / "shared_llada.json").read_text())["generate"]
    if "prompt_ids" in c
]


def run_level(server: Server, concurrency: int, per_stream: int, max_tokens: int) -> dict:
    body = {
        "model": "llada-tiny",
        "max_tokens": max_tokens,
        "diffusion_steps": max_tokens,
        "block_length": min(32, max_tokens),
        "eos_early_stop": False,
    }

    def stream(k: int) -> int:
        done = 0
        with httpx.Client(timeout=300) as client:
            for j in range(per_stream):
                prompt = PROMPTS[(k * per_stream + j) % len(PROMPTS)]
                r = client.post(server.url + "/completions", json={**body, "prompt": prompt})
                r.raise_for_status()
                done += max_tokens
        return done

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(stream, range(concurrency)))
    wall = time.perf_counter() - t0
    stats = httpx.get(server.url + "/engine/stats").json()["workers"][0]
    return {
        "concurrency": concurrency,
        "requests": concurrency * per_stream,
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "batch_max": stats["batch_size"]["max"],
    }


def sweep(threads: int, levels: list[int], per_stream: int, max_tokens: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        # start_allinone pins --num-threads 1; the later flag here wins.
        server = start_allinone(
            Path(tmp),
            "--model",
            str(GOLDEN / "llada-tiny"),
            "--max-num-seqs",
            str(max(levels)),
            "--num-threads",
            str(threads),
        )
        try:
            run_level(server, 1, 1, max_tokens)  # warm-up
            rows = [run_level(server, c, per_stream, max_tokens) for c in levels]
        finally:
            server.procs[0].stop()
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / base
        r["threads"] = threads
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests-per-stream", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--levels", default="1,2,4,8,16")
    ap.add_argument("--threads", default="1,2", help="--num-threads values to compare")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    results = {}
    for threads in [int(x) for x in args.threads.split(",")]:
        rows = sweep(threads, levels, args.requests_per_stream, args.max_tokens)
        results[threads] = rows
        print(f"\n--num-threads {threads}")
        print(table(rows))
    path = write_json("batching", {"max_tokens": args.max_tokens, "results": results})
    png = plot(
        "batching",
        levels,
        {f"threads={t}": [r["tokens_per_s"] for r in rows] for t, rows in results.items()},
        "concurrent streams",
        "canvas tokens / s",
    )
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()

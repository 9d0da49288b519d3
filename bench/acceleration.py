"""Worker acceleration options against eager float32, through real servers, in one run.

    .venv/bin/python bench/acceleration.py [--threads 1] [--rounds 3] [--concurrency 8]

One all-in-one server per option (a set of worker flags) on LLaDA-tiny, all up at once; each
idles while another is measured. Every single-prompt `generate` case of
tests/data/golden/cases/shared_llada.json is sent:

- tokens/s: canvas tokens over wall time (the whole canvas is decoded, eos_early_stop off,
  so every option does the same work), one request at a time and with --concurrency streams
  (batched steps). Rounds go over all options in turn (rotating the order); the figure is
  the median over rounds and the speedup the median of same-round ratios to eager float32,
  so the load of a shared machine moves both sides alike;
- startup: seconds from spawning the server to ready (loading, quantizing, compiling);
- memory: the worker's peak RSS (its /metrics) and the weights' bytes after the option is
  applied (quantized tensors' inner data counted);
- accuracy against the golden LLaDA outputs: exact answers, and token agreement (matching
  positions over the longer of the two answers, summed over the cases).

Writes bench/results/acceleration.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import httpx
import torch

from bench.common import GOLDEN, Server, start_allinone, table, write_json
from tests.conftest import free_port

SHARED = json.loads((GOLDEN / "cases" / "shared_llada.json").read_text())
CASES = [c for c in SHARED["generate"] if "prompt_ids" in c]
STOP = {SHARED["eos_token_id"], 485}  # <|endoftext|>, <|eot_id|>

OPTIONS: list[tuple[str, list[str]]] = [
    ("eager fp32 (baseline)", []),
    ("attention eager", ["--attention", "eager"]),
    ("compile default", ["--compile"]),
    ("compile reduce-overhead", ["--compile", "--compile-mode", "reduce-overhead"]),
    ("compile max-autotune", ["--compile", "--compile-mode", "max-autotune"]),
    ("int8", ["--quantization", "int8"]),
    ("int8 + compile", ["--quantization", "int8", "--compile"]),
    ("bf16", ["--dtype", "bfloat16"]),
    ("int4 (bf16)", ["--quantization", "int4"]),
]


def answer(ids: list[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in STOP:
            return ids[:i]
    return ids


def request(case: dict[str, Any]) -> dict[str, Any]:
    p = case["params"]
    body = {
        "model": "llada-tiny",
        "prompt": case["prompt_ids"],
        "max_tokens": p["gen_length"],
        "diffusion_steps": p["steps"],
        "block_length": p["block_length"],
        "remasking": p["remasking"],
        "temperature": p["temperature"],
        "return_token_ids": True,
        "eos_early_stop": False,
    }
    if "cfg_scale" in p:
        body["cfg_scale"] = p["cfg_scale"]
    return body


def run_pass(server: Server, concurrency: int) -> tuple[float, list[list[int]]]:
    """All cases with `concurrency` streams; (canvas tokens/s, answers in case order)."""

    def one(case: dict[str, Any]) -> list[int]:
        r = httpx.post(server.url + "/completions", json=request(case), timeout=600)
        r.raise_for_status()
        return list(r.json()["choices"][0]["token_ids"])

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        got = list(pool.map(one, CASES))
    wall = time.perf_counter() - start
    return sum(c["params"]["gen_length"] for c in CASES) / wall, got


def agreement(got: list[list[int]]) -> tuple[int, float]:
    exact, same, total = 0, 0, 0
    for case, ids in zip(CASES, got):
        want = answer(case["output_ids"])
        exact += ids == want
        same += sum(a == b for a, b in zip(ids, want))
        total += max(len(ids), len(want), 1)
    return exact, same / total


def weight_mib(flags: list[str]) -> float:
    """The weights' size with this option applied, measured in this process."""
    from vdiff_worker import accel
    from vdiff_worker.models import load_model

    opts = accel.Options.from_flags(
        compile=False,
        compile_mode="default",
        attention="sdpa",
        flash_attention=None,
        quantization=flags[flags.index("--quantization") + 1]
        if "--quantization" in flags
        else None,
    )
    dtype = flags[flags.index("--dtype") + 1] if "--dtype" in flags else "auto"
    loaded = load_model(str(GOLDEN / "llada-tiny"), dtype=accel.load_dtype(dtype, opts))
    accel.apply(loaded.model, opts, loaded.device)
    return accel.weight_bytes(loaded.model) / 2**20


def peak_rss_mib(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    match = re.search(r"^vdiff_host_memory_peak_bytes\{[^}]*\} (\S+)$", text, re.M)
    return float(match.group(1)) / 2**20 if match else float("nan")


@dataclass
class Running:
    name: str
    flags: list[str]
    server: Server
    metrics_port: int
    startup_s: float
    serial: list[float] = field(default_factory=list)  # tokens/s of each round
    batched: list[float] = field(default_factory=list)
    answers: list[list[int]] = field(default_factory=list)


def start(name: str, flags: list[str], tmp: Path, args: argparse.Namespace) -> Running:
    mport = free_port()
    logs = tmp / re.sub(r"\W+", "_", name)
    logs.mkdir()
    began = time.perf_counter()
    server = start_allinone(
        logs,
        "--model",
        str(GOLDEN / "llada-tiny"),
        "--num-threads",
        str(args.threads),
        "--max-num-seqs",
        str(args.concurrency * 2),
        "--metrics-port",
        str(mport),
        *flags,
        ready_timeout=900,
    )
    return Running(name, flags, server, mport, time.perf_counter() - began)


def summary(run: Running, base: Running) -> dict[str, Any]:
    """Medians over the rounds; speedups are the median of same-round ratios to the baseline,
    so a machine that gets busier or quieter between rounds moves both sides alike."""
    log = run.server.procs[0].output()
    exact, agree = agreement(run.answers)
    compiled = re.search(r"warm-up compiled in ([\d.]+) s", log)
    return {
        "option": run.name,
        "flags": " ".join(run.flags) or "-",
        "tok_s": median(run.serial),
        "speedup": median([a / b for a, b in zip(run.serial, base.serial)]),
        "tok_s_batched": median(run.batched),
        "speedup_batched": median([a / b for a, b in zip(run.batched, base.batched)]),
        "rounds_tok_s": run.serial,
        "rounds_tok_s_batched": run.batched,
        "startup_s": run.startup_s,
        "compile_s": float(compiled.group(1)) if compiled else 0.0,
        "weights_mib": weight_mib(run.flags),
        "peak_rss_mib": peak_rss_mib(run.metrics_port),
        "exact": f"{exact}/{len(CASES)}",
        "agreement": agree,
        "fell_back": "running eager from now on" in log or "unavailable; serving" in log,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1, help="worker --num-threads")
    ap.add_argument("--rounds", type=int, default=3, help="measurement rounds over all options")
    ap.add_argument("--concurrency", type=int, default=8, help="streams of the batched pass")
    ap.add_argument(
        "--only",
        default=None,
        help="comma-separated option names to run (the baseline always runs)",
    )
    args = ap.parse_args()
    chosen = (
        OPTIONS
        if args.only is None
        else [o for o in OPTIONS if o[0] in args.only.split(",") or not o[1]]
    )
    runs: list[Running] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name, flags in chosen:  # every server up at once; each idles when not measured
                print(f"... starting {name}", flush=True)
                runs.append(start(name, flags, Path(tmp), args))
                _, runs[-1].answers = run_pass(runs[-1].server, 1)  # warm-up and accuracy
            for r in range(args.rounds):
                print(f"... round {r + 1}/{args.rounds}", flush=True)
                for run in runs[r % len(runs) :] + runs[: r % len(runs)]:  # rotate the order
                    run.serial.append(run_pass(run.server, 1)[0])
                    run.batched.append(run_pass(run.server, args.concurrency)[0])
            rows = [summary(run, runs[0]) for run in runs]
        finally:
            for run in runs:
                run.server.procs[0].stop()
    shown = [
        {
            k: r[k]
            for k in (
                "option",
                "tok_s",
                "speedup",
                "tok_s_batched",
                "speedup_batched",
                "startup_s",
                "weights_mib",
                "peak_rss_mib",
                "exact",
                "agreement",
            )
        }
        for r in rows
    ]
    print(table(shown))
    base = runs[0].serial
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "baseline_spread": max(base) / min(base),
        "cases": len(CASES),
        "canvas_tokens": sum(c["params"]["gen_length"] for c in CASES),
    }
    path = write_json("acceleration", {"machine": machine, "results": rows})
    print(
        f"\nbaseline tokens/s varied {machine['baseline_spread']:.2f}x across rounds "
        f"(machine noise)\nwrote {path}"
    )


if __name__ == "__main__":
    main()

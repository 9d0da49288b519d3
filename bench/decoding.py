"""Decoding strategies side by side, through real servers, with known answers.

    .venv/bin/python bench/decoding.py [--gen-length 128] [--block-length 32] [--threads 1]

Three all-in-one servers, one request at a time, at temperature 0:

- vdiff-tiny (the built-in model, APD on with its verifier vdiff-tiny-ar) on the held-out
  task suite (vdiff_worker.tiny.tasks, ``--n-per-kind`` per kind) as chat requests: the one
  model here that answers, so its accuracy means something.
- LLaDA-tiny and Dream-tiny (APD verifier ar-tiny) on the golden cases' prompts (their
  ``task``/``answer`` fields): random weights, so accuracy only shows that strategies agree.

Strategies: ``reference`` (LLaDA's generate; with a cache, Fast-dLLM's fixed-step loop;
Dream's diffusion_generate with entropy), ``threshold`` and ``factor`` (Fast-dLLM) with cache
none, prefix and dual, and ``apd``.

By default the whole canvas is decoded (``eos_early_stop: false``), as the references and
Fast-dLLM's throughput figures do: tokens per forward is canvas tokens over
``usage.forward_passes`` (APD's verifier passes count as forwards), tokens/s is canvas tokens
over wall time. ``--early-stop`` measures what a client gets instead: the server stops at the
answer's end and tokens are completion tokens. Accuracy is exact match of the answer text.
Speedup is tokens/s over the same model's ``reference`` in the same run.

Writes bench/results/decoding.json and, with matplotlib, decoding.png (accuracy against
tokens/s).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import GOLDEN, RESULTS, start_allinone, table, write_json
from vdiff_worker.tiny import MODEL_DIR
from vdiff_worker.tiny.tasks import HELD_OUT_SEED, exact, suite

CASES = GOLDEN / "cases"

LLADA: list[tuple[str, dict[str, Any]]] = [
    ("reference", {"decoding": "reference"}),
    ("reference+prefix", {"decoding": "reference", "cache": "prefix"}),
    ("reference+dual", {"decoding": "reference", "cache": "dual"}),
    ("threshold", {"decoding": "threshold", "threshold": 0.9}),
    ("threshold+prefix", {"decoding": "threshold", "threshold": 0.9, "cache": "prefix"}),
    ("threshold+dual", {"decoding": "threshold", "threshold": 0.9, "cache": "dual"}),
    ("factor", {"decoding": "factor", "factor": 1.0}),
    ("factor+prefix", {"decoding": "factor", "factor": 1.0, "cache": "prefix"}),
    ("factor+dual", {"decoding": "factor", "factor": 1.0, "cache": "dual"}),
]
# APD commits left to right over the whole canvas: it has no blocks (None drops the field).
APD = ("apd", {"decoding": "apd", "apd_mixture_weight": 0.7, "block_length": None})
# Dream's sampler has no blocks either.
DREAM: list[tuple[str, dict[str, Any]]] = [
    ("reference", {"decoding": "reference", "alg": "entropy", "block_length": None}),
    APD,
]


def golden_prompts(*files: str) -> list[dict[str, Any]]:
    """The distinct single prompts of the golden cases, with their task and answer."""
    seen: dict[tuple[int, ...], dict[str, Any]] = {}
    for name in files:
        data = json.loads((CASES / name).read_text())
        for group in data.values():
            if not isinstance(group, list):
                continue
            for case in group:
                if isinstance(case, dict) and "prompt_ids" in case and "answer" in case:
                    seen.setdefault(
                        tuple(case["prompt_ids"]),
                        {
                            "prompt": case["prompt_ids"],
                            "task": case["task"],
                            "answer": case["answer"],
                        },
                    )
    return list(seen.values())


def suite_prompts(n_per_kind: int) -> list[dict[str, Any]]:
    """The held-out suite as chat requests."""
    return [
        {"messages": [{"role": "user", "content": t.prompt}], "task": t.kind, "answer": t.answer}
        for t in suite(n_per_kind=n_per_kind, seed=HELD_OUT_SEED)
    ]


def bench_model(
    tmp: Path,
    model_dir: Path,
    flags: list[str],
    prompts: list[dict[str, Any]],
    strategies: list[tuple[str, dict[str, Any]]],
    base: dict[str, Any],
    early_stop: bool,
) -> dict[str, dict[str, Any]]:
    """Every prompt through every strategy, strategies interleaved per prompt so that load
    from elsewhere on the machine falls on all of them alike. A prompt is token ids
    (``prompt``, to /v1/completions) or ``messages`` (to /v1/chat/completions)."""
    server = start_allinone(tmp, "--model", str(model_dir), *flags)
    runs: dict[str, dict[str, Any]] = {
        label: {
            "request": fields,
            "correct": 0,
            "tokens": 0,
            "passes": 0,
            "seconds": 0.0,
            "by_task": {},
        }
        for label, fields in strategies
    }
    try:
        with httpx.Client(timeout=600) as client:
            for p in prompts:
                for label, fields in strategies:
                    run = runs[label]
                    if "error" in run:
                        continue
                    chat = "messages" in p
                    t0 = time.perf_counter()
                    r = client.post(
                        server.url + ("/chat/completions" if chat else "/completions"),
                        json={
                            **{k: v for k, v in {**base, **fields}.items() if v is not None},
                            "model": model_dir.name,
                            "eos_early_stop": early_stop,
                            **({"messages": p["messages"]} if chat else {"prompt": p["prompt"]}),
                        },
                    )
                    run["seconds"] += time.perf_counter() - t0
                    if r.status_code != 200:
                        run["error"] = r.json()["error"]["message"]
                        continue
                    out = r.json()
                    choice = out["choices"][0]
                    ok = exact(
                        (choice["message"]["content"] if chat else choice["text"]) or "",
                        p["answer"],
                    )
                    run["correct"] += ok
                    run["by_task"].setdefault(p["task"], []).append(ok)
                    run["tokens"] += (
                        out["usage"]["completion_tokens"] if early_stop else base["max_tokens"]
                    )
                    run["passes"] += out["usage"]["forward_passes"]
    finally:
        server.procs[0].stop()
    results: dict[str, dict[str, Any]] = {}
    for label, run in runs.items():
        if "error" in run:
            results[label] = {"request": run["request"], "error": run["error"]}
            continue
        results[label] = {
            "request": run["request"],
            "accuracy": run["correct"] / len(prompts),
            "per_task": {k: sum(v) / len(v) for k, v in sorted(run["by_task"].items())},
            "tokens_per_forward": run["tokens"] / run["passes"],
            "tokens_per_s": run["tokens"] / run["seconds"],
            "forwards_per_request": run["passes"] / len(prompts),
            "seconds": run["seconds"],
        }
    ref = results["reference"].get("tokens_per_s")
    for res in results.values():
        if "error" not in res:
            res["speedup"] = res["tokens_per_s"] / ref if ref else None
    return results


def plot(results: dict[str, dict[str, dict[str, Any]]], name: str = "decoding") -> Path | None:
    """Accuracy against tokens/s, one point per strategy, when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for (model, runs), marker in zip(results.items(), "^os"):
        for label, r in runs.items():
            if "error" not in r:
                ax.scatter(
                    r["tokens_per_s"], r["accuracy"], marker=marker, label=f"{model} {label}"
                )
    ax.set_xscale("log")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("tokens / s")
    ax.set_ylabel("exact match (vdiff-tiny: held-out suite)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gen-length", type=int, default=128, help="canvas length (max_tokens)")
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="the workers' --num-threads")
    ap.add_argument(
        "--early-stop",
        action="store_true",
        help="stop at the answer's end and count completion tokens",
    )
    ap.add_argument(
        "--n-per-kind", type=int, default=8, help="held-out prompts per task kind for vdiff-tiny"
    )
    args = ap.parse_args(argv)
    # No diffusion_steps: the reference then takes one step per canvas token, and the other
    # strategies refuse the field.
    base = {
        "max_tokens": args.gen_length,
        "block_length": args.block_length,
        "temperature": 0.0,
        "return_token_ids": True,
    }
    threads = ["--num-threads", str(args.threads)]  # after start_allinone's: this one wins
    llada_prompts = golden_prompts("shared_llada.json")
    dream_prompts = golden_prompts("shared_dream.json", "shared_apd.json")
    tiny_prompts = suite_prompts(args.n_per_kind)
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "vdiff-tiny": bench_model(
                Path(tmp),
                MODEL_DIR,
                [*threads, "--enable-apd"],
                tiny_prompts,
                [*LLADA, APD],
                base,
                args.early_stop,
            ),
            "llada-tiny": bench_model(
                Path(tmp),
                GOLDEN / "llada-tiny",
                threads,
                llada_prompts,
                LLADA,
                base,
                args.early_stop,
            ),
            "dream-tiny": bench_model(
                Path(tmp),
                GOLDEN / "dream-tiny",
                [*threads, "--enable-apd", "--apd-verifier", str(GOLDEN / "ar-tiny")],
                dream_prompts,
                DREAM,
                base,
                args.early_stop,
            ),
        }
    rows = [
        {
            "model": model,
            "strategy": label,
            "accuracy": r["accuracy"],
            "tok/fwd": r["tokens_per_forward"],
            "tok/s": r["tokens_per_s"],
            "speedup": r["speedup"],
            "fwd/req": r["forwards_per_request"],
        }
        for model, runs in results.items()
        for label, r in runs.items()
        if "error" not in r
    ]
    print()
    print(table(rows))
    for model, runs in results.items():
        for label, r in runs.items():
            if "error" in r:
                print(f"{model} {label}: refused: {r['error']}")
    path = write_json(
        "decoding",
        {
            "gen_length": args.gen_length,
            "block_length": args.block_length,
            "threads": args.threads,
            "early_stop": args.early_stop,
            "prompts": {
                "vdiff-tiny": len(tiny_prompts),
                "llada-tiny": len(llada_prompts),
                "dream-tiny": len(dream_prompts),
            },
            "results": results,
        },
    )
    png = plot(results)
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()

"""Held-out accuracy of vdiff-tiny, per task kind, through the real server, per strategy.

    .venv/bin/python bench/accuracy.py [--n-per-kind 25] [--gen-length 32] [--threads 1]

The held-out suite (vdiff_worker.tiny.tasks, HELD_OUT_SEED; no prompt of it is trained on)
goes as chat requests at temperature 0, one at a time, to an all-in-one server serving the built-in
vdiff-tiny with APD on (verifier vdiff-tiny-ar), through every strategy: ``reference``
(LLaDA's generate, one token per step), Fast-dLLM ``threshold`` 0.9 and ``factor`` 1.0 with
cache none and dual, and ``apd`` at mixture weights R = 0.7 (the default) and 0.5. The
default canvas, 32 tokens in one block, holds every answer of the suite; the whole canvas is
decoded (``eos_early_stop: false``), so tokens per forward is canvas tokens over
``usage.forward_passes`` (APD's verifier passes count).
Accuracy is exact match of the whole answer; the accuracy delta is against ``reference`` in
the same run.

Writes bench/results/accuracy.json and accuracy.png (accuracy against tokens/s).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.common import table, write_json
from bench.decoding import APD, LLADA, bench_model, plot, suite_prompts
from vdiff_worker.tiny import MODEL_DIR
from vdiff_worker.tiny.tasks import HELD_OUT_SEED, KINDS

KEPT = ("reference", "threshold", "threshold+dual", "factor", "factor+dual")
STRATEGIES = [s for s in LLADA if s[0] in KEPT] + [
    APD,
    ("apd R=0.5", {**APD[1], "apd_mixture_weight": 0.5}),
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n-per-kind", type=int, default=25)
    ap.add_argument("--gen-length", type=int, default=32, help="canvas length (max_tokens)")
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="the worker's --num-threads")
    args = ap.parse_args(argv)
    base = {"max_tokens": args.gen_length, "block_length": args.block_length, "temperature": 0.0}
    prompts = suite_prompts(args.n_per_kind)
    with tempfile.TemporaryDirectory() as tmp:
        runs = bench_model(
            Path(tmp),
            MODEL_DIR,
            ["--num-threads", str(args.threads), "--enable-apd"],
            prompts,
            STRATEGIES,
            base,
            early_stop=False,
        )
    ref = runs["reference"]["accuracy"]
    rows = [
        {
            "strategy": label,
            **r["per_task"],
            "all": r["accuracy"],
            "Δ vs ref": r["accuracy"] - ref,
            "tok/fwd": r["tokens_per_forward"],
            "tok/s": r["tokens_per_s"],
            "speedup": r["speedup"],
        }
        for label, r in runs.items()
        if "error" not in r
    ]
    print()
    print(table(rows))
    for label, r in runs.items():
        if "error" in r:
            print(f"{label}: refused: {r['error']}")
    path = write_json(
        "accuracy",
        {
            "model": "vdiff-tiny",
            "held_out_seed": HELD_OUT_SEED,
            "n_per_kind": args.n_per_kind,
            "kinds": list(KINDS),
            "gen_length": args.gen_length,
            "block_length": args.block_length,
            "threads": args.threads,
            "results": runs,
        },
    )
    png = plot({"vdiff-tiny": runs}, name="accuracy")
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()

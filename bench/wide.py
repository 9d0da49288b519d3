"""The engine at a real model's width: generated checkpoints, each acceleration option.

    .venv/bin/python -m bench.wide [--layers 2] [--options sdpa,flash,compile,int8,int4]
                                   [--levels 1,16] [--max-tokens 128] [--small]

Writes two checkpoints in their real layouts with random weights, as wide as the models users
serve but only ``--layers`` deep: LLaDA-8B's (4,096 wide, 32 heads, MLP 12,288, vocabulary
126,464) and LLaDA2.0-mini's (2,048 wide, 16 query and 4 key/value heads of 128, a dense first
layer, then 256 experts of 512 in 8 groups, 8 per token, one shared expert, vocabulary 157,184),
in bfloat16 with the golden tiny models' tokenizers (output rows past the tokenizer's vocabulary
are zero, so the argmax stays inside it). Then, for each option (a set of worker flags: ``sdpa``
PyTorch's scaled_dot_product_attention, ``flash`` FlashAttention, ``compile`` torch.compile with
CUDA graphs, ``int8`` / ``int4`` weight-only quantization), it runs bench.engine's measurement
on them: the default modes through a real server at each concurrency, and the bare model's
forward at the same shapes in the same run, with the same option (the bound). ``--small`` writes
256-wide ones instead, to check the script on a CPU.

Prints the table and writes bench/results/wide.json. Needs a GPU for figures worth reading:
on this project's 2-core VMs only ``--small`` finishes in minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bench.common import GOLDEN, write_json
from bench.engine import STEPS, Group, Mode, measure, show

# option -> (worker flags, the same as vdiff_worker.accel.Options fields, for the bound)
OPTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "sdpa": (("--attention", "sdpa"), {"attention": "sdpa"}),
    "flash": (("--attention", "flash"), {"attention": "flash"}),
    "compile": (
        ("--compile", "--compile-mode", "reduce-overhead"),
        {"compile": True, "compile_mode": "reduce-overhead"},
    ),
    "int8": (("--quantization", "int8"), {"quantization": "int8"}),
    "int4": (("--quantization", "int4"), {"quantization": "int4"}),
}
LLADA_MODES = (
    Mode("threshold+dual", {"decoding": "threshold", "threshold": 0.9, "cache": "dual"}),
    Mode("reference+dual", {"decoding": "reference", "diffusion_steps": STEPS, "cache": "dual"}),
)
LLADA2_MODES = (Mode("reference+block cache", {"decoding": "reference", "cache": "prefix"}),)

# (config overrides of the golden tiny config) per layout; the tiny ones for --small.
LLADA_WIDE = {
    "d_model": 4096,
    "n_heads": 32,
    "n_kv_heads": 32,
    "mlp_hidden_size": 12288,
    "embedding_size": 126464,
    "vocab_size": 126464,
    "max_sequence_length": 4096,
}
LLADA_SMALL = {
    **LLADA_WIDE,
    "d_model": 256,
    "mlp_hidden_size": 768,
    "n_heads": 4,
    "n_kv_heads": 4,
    "embedding_size": 1024,
    "vocab_size": 1024,
}
LLADA2_WIDE = {
    "hidden_size": 2048,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "rotary_dim": 64,
    "intermediate_size": 5120,
    "moe_intermediate_size": 512,
    "num_experts": 256,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "vocab_size": 157184,
    "max_position_embeddings": 8192,
}
LLADA2_SMALL = {
    **LLADA2_WIDE,
    "hidden_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "rotary_dim": 32,
    "intermediate_size": 512,
    "moe_intermediate_size": 64,
    "num_experts": 32,
    "vocab_size": 1024,
}


def _init(shape: tuple[int, ...], name: str, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight") or "layernorm" in name or name.endswith("ln_f.weight"):
        return torch.ones(shape)
    if name.endswith("expert_bias"):
        return torch.zeros(shape)
    return torch.randn(shape, generator=gen) * 0.02


def generate(src: str, config: dict[str, Any], layers: int, out: Path) -> Path:
    """A copy of golden checkpoint ``src`` at the width ``config`` says, ``layers`` deep:
    the tokenizer files as they are, random bfloat16 weights of the model's own shapes."""
    out.mkdir(parents=True, exist_ok=True)
    for f in (GOLDEN / src).iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, out / f.name)
    cfg = json.loads((GOLDEN / src / "config.json").read_text()) | config
    cfg["n_layers" if "n_layers" in cfg else "num_hidden_layers"] = layers
    cfg["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    shapes = _shapes(cfg)
    vocab = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        t = _init(shape, name, gen)
        if name in ("lm_head.weight", "model.transformer.ff_out.weight"):
            t[vocab:] = 0.0  # never a token the tokenizer lacks
        tensors[name] = t.to(torch.bfloat16)
    save_file(tensors, str(out / "model.safetensors"))
    return out


def _shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensor names and shapes, from the model built on the meta device
    (no memory)."""
    from vdiff_worker.models.llada import LLaDAConfig, LLaDAModel
    from vdiff_worker.models.llada2 import LLaDA2Config, LLaDA2Model
    from vdiff_worker.models.packing import checkpoint_state

    with torch.device("meta"):
        model: torch.nn.Module = (
            LLaDAModel(LLaDAConfig.from_dict(cfg))
            if "n_layers" in cfg
            else LLaDA2Model(LLaDA2Config.from_dict(cfg))
        )
    return {name: tuple(t.shape) for name, t in checkpoint_state(model).items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=2, help="transformer layers of each model")
    ap.add_argument("--options", default="sdpa,flash,compile,int8", help=f"of {', '.join(OPTIONS)}")
    ap.add_argument("--levels", default="1,16", help="concurrencies")
    ap.add_argument("--max-tokens", type=int, default=128, help="canvas length per request")
    ap.add_argument("--requests", type=int, default=1, help="requests per client per level")
    ap.add_argument("--small", action="store_true", help="256-wide models, to check on a CPU")
    args = ap.parse_args(argv)
    options = [o.strip() for o in args.options.split(",") if o.strip()]
    unknown = set(options) - set(OPTIONS)
    if unknown:
        ap.error(f"unknown options {sorted(unknown)}; known: {', '.join(OPTIONS)}")
    levels = tuple(int(x) for x in args.levels.split(","))
    results: dict[str, dict[str, dict[str, Any]]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        made = {
            "llada-wide": generate(
                "llada-tiny", LLADA_SMALL if args.small else LLADA_WIDE, args.layers, root / "l1"
            ),
            "llada2-wide": generate(
                "llada2-tiny",
                LLADA2_SMALL if args.small else LLADA2_WIDE,
                args.layers,
                root / "l2",
            ),
        }
        for option in options:
            for name, path in made.items():
                llada2 = name.startswith("llada2")
                group = Group(
                    f"{name}-{option}",
                    "shared_llada2.json" if llada2 else "shared_llada.json",
                    LLADA2_MODES if llada2 else LLADA_MODES,
                    path=path,
                    flags=OPTIONS[option][0],
                    accel=OPTIONS[option][1],
                )
                results[group.model] = measure(
                    root, group, list(group.modes), args.max_tokens, args.requests, levels
                )
    show(results)
    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "layers": args.layers,
        "small": args.small,
        "max_tokens": args.max_tokens,
        "seconds": time.perf_counter() - started,
        "results": results,
    }
    path = write_json("wide", report)
    print(f"\nwrote {path}")
    return report


if __name__ == "__main__":
    main()

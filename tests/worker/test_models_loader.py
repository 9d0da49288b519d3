"""Checkpoint loader: sharded half-precision checkpoints, dtypes, and user-facing errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from vdiff_worker.models import CheckpointError, load_model, loader
from vdiff_worker.models.loader import resolve_dtype

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
LLADA = GOLDEN / "llada-tiny"
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def _copy_checkpoint(
    dst: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any] | None = None
) -> Path:
    """A llada-tiny look-alike in ``dst`` with the given weights and config."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in SIDE_FILES:
        shutil.copy(LLADA / name, dst / name)
    cfg = config if config is not None else json.loads((LLADA / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def llada_weights() -> dict[str, torch.Tensor]:
    return load_file(str(LLADA / "model.safetensors"))


@pytest.fixture(scope="module")
def sharded_bf16(tmp_path_factory: pytest.TempPathFactory, llada_weights: dict) -> Path:
    root = tmp_path_factory.mktemp("llada-bf16")
    names = sorted(llada_weights)
    shards = {"model-00001-of-00002.safetensors": names[::2]}
    shards["model-00002-of-00002.safetensors"] = names[1::2]
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: llada_weights[k].to(torch.bfloat16) for k in keys}, str(root / shard))
        weight_map.update(dict.fromkeys(keys, shard))
    total = sum(t.numel() * 2 for t in llada_weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((LLADA / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16"}))
    for name in SIDE_FILES:
        shutil.copy(LLADA / name, root / name)
    return root


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / "cases" / "llada_logits.safetensors"))


@pytest.mark.parametrize(("dtype", "tol"), [("bfloat16", 0.25), ("float32", 0.1), ("auto", 0.1)])
def test_sharded_bf16_checkpoint(
    sharded_bf16: Path, reference: dict[str, torch.Tensor], dtype: str, tol: float
) -> None:
    loaded = load_model(str(sharded_bf16), dtype=dtype)
    # "auto" on CPU widens the checkpoint's bfloat16 to float32.
    want = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    assert loaded.dtype == want
    assert all(p.dtype == want for p in loaded.model.parameters())
    for k in range(3):
        with torch.no_grad():
            logits = loaded.model(reference[f"input_ids_{k}"][None]).logits[0]
        assert logits.dtype == want
        assert (logits.float() - reference[f"logits_{k}"]).abs().max().item() <= tol
        # Peaked distributions: the rounded weights still pick the same tokens.
        agree = logits.argmax(-1) == reference[f"logits_{k}"].argmax(-1)
        assert agree.float().mean().item() >= 0.95


def test_resolve_dtype_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    bf16 = {"torch_dtype": "bfloat16"}
    assert resolve_dtype("auto", bf16, torch.device("cpu")) == torch.float32
    monkeypatch.setattr(loader, "cuda_bf16", lambda device: True)
    assert resolve_dtype("auto", bf16, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", {}, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", {"torch_dtype": "float16"}, torch.device("cuda")) == torch.float16
    monkeypatch.setattr(loader, "cuda_bf16", lambda device: False)  # e.g. a V100 or T4
    assert resolve_dtype("auto", bf16, torch.device("cuda")) == torch.float16
    assert resolve_dtype("float32", bf16, torch.device("cuda")) == torch.float32
    assert resolve_dtype("float16", bf16, torch.device("cpu")) == torch.float16
    with pytest.raises(CheckpointError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", bf16, torch.device("cpu"))


def test_missing_directory_and_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_model(str(tmp_path))


def test_unknown_architecture_names_it_and_lists_supported(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["FooForMasking"], "model_type": "foo"})
    )
    with pytest.raises(CheckpointError) as err:
        load_model(str(tmp_path))
    message = str(err.value)
    assert "FooForMasking" in message
    assert "LLaDAModelLM" in message and "DreamModel" in message
    assert "DiffusionGemmaForBlockDiffusion" in message


def test_remote_code_is_only_suggested_for_the_fallback(tmp_path: Path) -> None:
    cfg = {
        "architectures": ["FooForCausalLM"],
        "model_type": "foo",
        "auto_map": {"AutoModelForCausalLM": "modeling_foo.FooForCausalLM"},
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="--trust-remote-code"):
        load_model(str(tmp_path))
    # With the flag the fallback tries transformers, which finds no modeling file.
    with pytest.raises(CheckpointError, match="transformers cannot load it"):
        load_model(str(tmp_path), trust_remote_code=True)


def test_missing_weight_is_named(tmp_path: Path, llada_weights: dict) -> None:
    weights = dict(llada_weights)
    del weights["model.transformer.blocks.2.up_proj.weight"]
    root = _copy_checkpoint(tmp_path / "ckpt", weights)
    with pytest.raises(CheckpointError, match=r"lacks weight\(s\) model\.transformer\.blocks\.2"):
        load_model(str(root))


def test_wrong_shape_is_named_with_both_shapes(tmp_path: Path, llada_weights: dict) -> None:
    weights = {**llada_weights, "model.transformer.ln_f.weight": torch.ones(64)}
    root = _copy_checkpoint(tmp_path / "ckpt", weights)
    with pytest.raises(CheckpointError) as err:
        load_model(str(root))
    assert "model.transformer.ln_f.weight has shape [64], the config implies [128]" in str(
        err.value
    )


def test_missing_shard_and_weights(tmp_path: Path, llada_weights: dict) -> None:
    root = _copy_checkpoint(tmp_path / "ckpt", llada_weights)
    (root / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load_model(str(root))
    index = {"weight_map": dict.fromkeys(llada_weights, "model-00001-of-00001.safetensors")}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing: \\['model-00001-of-00001"):
        load_model(str(root))


def test_unsupported_llada_variant_is_refused(tmp_path: Path, llada_weights: dict) -> None:
    cfg = {**json.loads((LLADA / "config.json").read_text()), "alibi": True}
    root = _copy_checkpoint(tmp_path / "ckpt", llada_weights, cfg)
    with pytest.raises(CheckpointError, match="alibi=True are not supported"):
        load_model(str(root))


def test_config_without_required_field(tmp_path: Path, llada_weights: dict) -> None:
    cfg = json.loads((LLADA / "config.json").read_text())
    del cfg["d_model"]
    root = _copy_checkpoint(tmp_path / "ckpt", llada_weights, cfg)
    with pytest.raises(CheckpointError, match="lacks 'd_model'"):
        load_model(str(root))


def test_max_model_len_and_tokenizer_override(tmp_path: Path, llada_weights: dict) -> None:
    cfg = {**json.loads((LLADA / "config.json").read_text()), "max_sequence_length": 300}
    root = _copy_checkpoint(tmp_path / "ckpt", llada_weights, cfg)
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    loaded = load_model(str(root), tokenizer_path=str(LLADA), chat_template=str(template))
    assert loaded.max_model_len == 300
    assert loaded.name == "ckpt"
    ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert loaded.tokenizer.decode(ids) == "hi"

"""LLaDA2 (MoE): logits parity with the reference under the block-causal mask, the slot
cache, sharded bfloat16 checkpoints, config refusals and int8 over the experts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tests.worker.drive import slots_for
from vdiff_worker import accel
from vdiff_worker.models import CheckpointError, LoadedModel, load_model
from vdiff_worker.models.llada2 import LLaDA2Router

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
LLADA2 = GOLDEN / "llada2-tiny"
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
BLOCK = 8
TOL = 1e-4
CPU = torch.device("cpu")


def block_limits(length: int, start: int = 0) -> torch.Tensor:
    """[1, length]: position p sees keys [0, end of its block)."""
    positions = torch.arange(start, start + length)
    return ((positions // BLOCK + 1) * BLOCK)[None]


@pytest.fixture(scope="module")
def llada2() -> LoadedModel:
    return load_model(str(LLADA2), dtype="float32")


@pytest.fixture(scope="module")
def case() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / "cases" / "llada2_logits.safetensors"))


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return load_file(str(LLADA2 / "model.safetensors"))


def _checkpoint(
    dst: Path,
    tensors: dict[str, torch.Tensor],
    shards: int = 1,
    config: dict[str, Any] | None = None,
) -> Path:
    """A llada2-tiny look-alike in ``dst``: these weights, split over ``shards`` files."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in SIDE_FILES:
        shutil.copy(LLADA2 / name, dst / name)
    cfg = config if config is not None else json.loads((LLADA2 / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(cfg))
    if shards == 1:
        save_file(tensors, str(dst / "model.safetensors"))
        return dst
    names = sorted(tensors)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({k: tensors[k] for k in part}, str(dst / shard))
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def test_loaded_metadata_and_tokenizer(llada2: LoadedModel) -> None:
    assert llada2.kind == "llada2"
    assert llada2.name == "llada2-tiny"
    assert llada2.mask_token_id == 499
    assert llada2.max_model_len == 1024
    assert not llada2.model.training
    assert not any(p.requires_grad for p in llada2.model.parameters())
    tok = llada2.tokenizer
    assert 495 in tok.stop_token_ids  # <|endoftext|>, EOS = pad
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    want = "<role>HUMAN</role>hi<|role_end|><role>ASSISTANT</role>"
    assert tok.decode(ids, skip_special_tokens=False) == want
    assert ids[0] == tok.token_to_id("<role>") and ids[-1] == tok.token_to_id("</role>")
    assert tok.token_to_id("<|role_end|>") in ids


def test_logits_match_reference_block_causal(
    llada2: LoadedModel, case: dict[str, torch.Tensor]
) -> None:
    ids = case["input_ids_0"][None]
    with torch.no_grad():
        out = llada2.model(ids, limits=block_limits(ids.shape[1]))
    assert out.logits.dtype == torch.float32
    diff = (out.logits[0] - case["logits_0"]).abs().max().item()
    assert diff <= TOL
    # The mask matters: attending bidirectionally gives other logits.
    with torch.no_grad():
        free = llada2.model(ids).logits[0]
    assert (free - case["logits_0"]).abs().max().item() > 1.0


def test_a_cached_block_equals_the_full_pass(
    llada2: LoadedModel, case: dict[str, torch.Tensor]
) -> None:
    ids = case["input_ids_0"][None]
    prefix = 3 * BLOCK
    with torch.no_grad():
        full = llada2.model(ids, limits=block_limits(ids.shape[1])).logits
        # Blocks 0..2 fill the slot; block 3 then runs alone against it.
        fill = slots_for(llada2.model, [(1, 0, prefix, prefix)])
        llada2.model(ids[:, :prefix], cache=fill, limits=block_limits(prefix))
        cache = slots_for(llada2.model, [(1, prefix, BLOCK, prefix + BLOCK)], fill.store)
        block = llada2.model(
            ids[:, prefix : prefix + BLOCK],
            cache=cache,
            limits=torch.full((1, BLOCK), prefix + BLOCK),
        ).logits
    assert cache.span == prefix + BLOCK
    assert torch.allclose(block, full[:, prefix : prefix + BLOCK], atol=1e-5)


def test_batched_rows_route_as_alone(llada2: LoadedModel, case: dict[str, torch.Tensor]) -> None:
    # Experts run over the tokens of every row at once; each row must still get its own.
    a = case["input_ids_0"][None]
    b = a.clone()
    b[0, 7:12] = torch.tensor([40, 41, 42, 43, 44])
    limits = block_limits(a.shape[1])
    with torch.no_grad():
        both = llada2.model(torch.cat([a, b]), limits=limits.expand(2, -1)).logits
        alone = [llada2.model(x, limits=limits).logits[0] for x in (a, b)]
    assert torch.allclose(both[0], alone[0], atol=1e-5)
    assert torch.allclose(both[1], alone[1], atol=1e-5)


def test_sharded_bfloat16_checkpoint(
    tmp_path: Path,
    llada2: LoadedModel,
    case: dict[str, torch.Tensor],
    weights: dict[str, torch.Tensor],
) -> None:
    bf16 = {k: v.to(torch.bfloat16) for k, v in weights.items()}
    cfg = {**json.loads((LLADA2 / "config.json").read_text()), "torch_dtype": "bfloat16"}
    root = _checkpoint(tmp_path / "bf16", bf16, shards=3, config=cfg)
    loaded = load_model(str(root), dtype="bfloat16")
    assert loaded.kind == "llada2" and loaded.dtype == torch.bfloat16
    params = dict(loaded.model.named_parameters())
    assert "model.layers.1.mlp.gate.expert_bias" in params
    assert all(p.dtype == torch.bfloat16 and p.device == CPU for p in params.values())
    ids = case["input_ids_0"][None]
    with torch.no_grad():
        logits = loaded.model(ids, limits=block_limits(ids.shape[1])).logits[0]
    assert logits.dtype == torch.bfloat16
    ref = case["logits_0"]
    # Loose: in bfloat16 one token's router picks another expert; the reference run in
    # bfloat16 differs from its float32 logits by the same 2.1 at most.
    diff = (logits.float() - ref).abs()
    assert diff.max().item() <= 3.0 and diff.mean().item() <= 0.3
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9


def test_missing_expert_weight_is_named(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    name = "model.layers.1.mlp.experts.5.down_proj.weight"
    partial = {k: v for k, v in weights.items() if k != name}
    root = _checkpoint(tmp_path / "partial", partial, shards=2)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_model(str(root))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"score_function": "softmax"}, "score_function='softmax' are not supported"),
        ({"rope_scaling": {"type": "yarn"}}, "rope_scaling="),
        ({"use_rmsnorm": False}, "use_rmsnorm=False"),
        ({"router_dtype": "bf16"}, "router_dtype='bf16'"),
        ({"rotary_dim": 16}, "rotary_dim=16 disagrees"),
        ({"n_group": 3}, "n_group=3"),
    ],
)
def test_unsupported_configs_are_refused(
    tmp_path: Path, weights: dict[str, torch.Tensor], change: dict[str, Any], message: str
) -> None:
    cfg = {**json.loads((LLADA2 / "config.json").read_text()), **change}
    root = _checkpoint(tmp_path / "cfg", weights, config=cfg)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_model(str(root))


def test_int8_quantizes_every_expert(llada2: LoadedModel, case: dict[str, torch.Tensor]) -> None:
    loaded = load_model(
        str(LLADA2), dtype=accel.load_dtype("auto", accel.Options(quantization="int8"))
    )
    linears = [n for n, m in loaded.model.named_modules() if isinstance(m, nn.Linear)]
    experts = [n for n in linears if ".mlp.experts." in n]
    assert len(experts) == 8 * 2  # 8 experts of packed gate-and-up / down
    assert accel.quantize(loaded.model, "int8", CPU) == len(linears)
    for name in experts:
        # int8 values plus per-row scales: about a quarter of the float32 weight.
        quantized = accel.weight_bytes(loaded.model.get_submodule(name))
        assert quantized <= 0.4 * accel.weight_bytes(llada2.model.get_submodule(name))
    # The router is no Linear: it keeps its float weights and picks experts as before.
    routers = [m for m in loaded.model.modules() if isinstance(m, LLaDA2Router)]
    assert routers and all(type(r.weight) is nn.Parameter for r in routers)
    assert accel.weight_bytes(loaded.model) <= 0.5 * accel.weight_bytes(llada2.model)
    ids = case["input_ids_0"][None]
    with torch.no_grad():
        logits = loaded.model(ids, limits=block_limits(ids.shape[1])).logits[0].float()
    ref = case["logits_0"]
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9

"""Packed linears: one matmul with separate layers' bits, under the checkpoint's names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vdiff_worker.models import CheckpointError, load_model
from vdiff_worker.models.llada import LLaDAConfig, LLaDAModel
from vdiff_worker.models.packing import (
    Packed,
    checkpoint_parts,
    checkpoint_state,
    load_checkpoint_state,
)

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 32, 150])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_matmul_gives_each_layer_its_own_bits(rows: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(rows)
    widths = (("q_proj", 128), ("k_proj", 32), ("v_proj", 32))
    layer = Packed(128, widths, bias=True).to(dtype)
    x = torch.randn(2, rows, 128, generator=gen).to(dtype)
    with torch.no_grad():
        out = layer(x).split([w for _, w in layer.parts], dim=-1)
        offset = 0
        for got, (_, width) in zip(out, widths, strict=True):
            w = layer.weight[offset : offset + width].contiguous()
            b = layer.bias[offset : offset + width].contiguous()
            assert torch.equal(got, F.linear(x, w, b))
            offset += width


@pytest.mark.parametrize("name", ["llada-tiny", "dream-tiny", "llada2-tiny"])
def test_the_checkpoint_names_and_tensors_come_back_as_stored(name: str) -> None:
    loaded = load_model(str(GOLDEN / name))
    stored = load_file(str(GOLDEN / name / "model.safetensors"))
    state = checkpoint_state(loaded.model)
    assert sorted(state) == sorted(stored)
    assert all(torch.equal(state[k], stored[k]) for k in stored)


def test_a_state_dict_in_checkpoint_names_loads_into_a_fresh_model() -> None:
    loaded = load_model(str(GOLDEN / "llada-tiny"))
    cfg = json.loads((GOLDEN / "llada-tiny" / "config.json").read_text())
    fresh = LLaDAModel(LLaDAConfig.from_dict(cfg)).eval()
    load_checkpoint_state(fresh, load_file(str(GOLDEN / "llada-tiny" / "model.safetensors")))
    ids = torch.arange(40)[None]
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, loaded.model(ids).logits)
    with pytest.raises(KeyError, match=r"missing \['model\.transformer\.blocks\.0\.k_proj"):
        state = checkpoint_state(fresh)
        del state["model.transformer.blocks.0.k_proj.weight"]
        load_checkpoint_state(fresh, state)


def test_packed_parts_are_named_and_ordered() -> None:
    cfg = json.loads((GOLDEN / "llada-tiny" / "config.json").read_text())
    with torch.device("meta"):
        model = LLaDAModel(LLaDAConfig.from_dict(cfg))
    parts = checkpoint_parts(model)["model.transformer.blocks.3.qkv.weight"]
    assert [(p.name, p.offset, p.rows) for p in parts] == [
        ("model.transformer.blocks.3.q_proj.weight", 0, 128),
        ("model.transformer.blocks.3.k_proj.weight", 128, 128),
        ("model.transformer.blocks.3.v_proj.weight", 256, 128),
    ]


def test_a_part_of_the_wrong_shape_is_named(tmp_path: Path) -> None:
    src = GOLDEN / "llada-tiny"
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    weights = load_file(str(src / "model.safetensors"))
    weights["model.transformer.blocks.1.v_proj.weight"] = torch.zeros(64, 128)
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"blocks\.1\.v_proj\.weight has shape \[64, 128\]"):
        load_model(str(tmp_path))

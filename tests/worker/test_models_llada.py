"""LLaDA: logits parity with the reference implementation, and the cache forward API."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vdiff_worker.models import LoadedModel, load_model

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
TOL = 1e-4


@pytest.fixture(scope="module")
def llada() -> LoadedModel:
    return load_model(str(GOLDEN / "llada-tiny"))


@pytest.fixture(scope="module")
def cases() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / "cases" / "llada_logits.safetensors"))


def test_loaded_metadata(llada: LoadedModel) -> None:
    assert llada.kind == "llada"
    assert llada.name == "llada-tiny"
    assert llada.mask_token_id == 482
    assert llada.max_model_len == 512
    assert llada.dtype == torch.float32
    assert not llada.model.training
    assert not any(p.requires_grad for p in llada.model.parameters())


@pytest.mark.parametrize("k", [0, 1, 2])
def test_logits_match_reference(llada: LoadedModel, cases: dict[str, torch.Tensor], k: int) -> None:
    with torch.no_grad():
        out = llada.model(cases[f"input_ids_{k}"][None])
    assert out.kv is None
    assert out.logits.dtype == torch.float32
    assert (out.logits[0] - cases[f"logits_{k}"]).abs().max().item() <= TOL


def test_left_padded_batch_matches_reference(
    llada: LoadedModel, cases: dict[str, torch.Tensor]
) -> None:
    ids = cases["input_ids_batch"]
    # LLaDA does not shift RoPE for padding: positions stay arange; pad keys are masked.
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        out = llada.model(
            ids, position_ids=positions, key_mask=cases["attention_mask_batch"].bool()
        )
    assert (out.logits - cases["logits_batch"]).abs().max().item() <= TOL


def test_prefix_and_dual_cache_reproduce_full_forward(
    llada: LoadedModel, cases: dict[str, torch.Tensor]
) -> None:
    ids = cases["input_ids_1"][None]
    p, s = 20, 8  # prefix, block [p, p + s), suffix after it
    with torch.no_grad():
        full = llada.model(ids, return_kv=True)
        assert full.kv is not None and len(full.kv) == 4
        assert full.kv[0][0].shape == (1, 4, ids.shape[1], 32)
        before = [(k[:, :, :p], v[:, :, :p]) for k, v in full.kv]
        after = [(k[:, :, p + s :], v[:, :, p + s :]) for k, v in full.kv]
        prefix = llada.model(ids[:, p:], kv_before=before, return_kv=True)
        dual = llada.model(ids[:, p : p + s], kv_before=before, kv_after=after)
    # Prefix cache: keys for the tokens after the block are recomputed, so the whole tail
    # matches; dual cache: the block sees the exact same keys as the full pass.
    assert (prefix.logits - full.logits[:, p:]).abs().max().item() <= TOL
    assert prefix.kv is not None and prefix.kv[0][0].shape[2] == ids.shape[1] - p
    assert (dual.logits - full.logits[:, p : p + s]).abs().max().item() <= TOL


def test_key_mask_covers_cached_keys(llada: LoadedModel, cases: dict[str, torch.Tensor]) -> None:
    ids = cases["input_ids_0"][None]
    mask = torch.ones(1, ids.shape[1], dtype=torch.bool)
    mask[0, :3] = False
    with torch.no_grad():
        ref = llada.model(ids, key_mask=mask, return_kv=True)
        assert ref.kv is not None
        before = [(k[:, :, :10], v[:, :, :10]) for k, v in ref.kv]
        cached = llada.model(ids[:, 10:], kv_before=before, key_mask=mask)
        with pytest.raises(ValueError, match="key_mask"):
            llada.model(ids[:, 10:], kv_before=before, key_mask=mask[:, 10:])
    assert (cached.logits - ref.logits[:, 10:]).abs().max().item() <= TOL


def test_fully_masked_row_gives_no_nan(llada: LoadedModel) -> None:
    ids = torch.full((2, 6), 481)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1] = False
    with torch.no_grad():
        out = llada.model(ids, key_mask=mask)
    assert torch.isfinite(out.logits).all()

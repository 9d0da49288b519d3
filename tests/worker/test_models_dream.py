"""Dream: raw logits parity with the reference implementation, padding and GQA caches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.worker.drive import slots_for
from vdiff_worker.models import LoadedModel, load_model

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
TOL = 1e-4
PAD = 480


@pytest.fixture(scope="module")
def dream() -> LoadedModel:
    return load_model(str(GOLDEN / "dream-tiny"))


@pytest.fixture(scope="module")
def cases() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / "cases" / "dream_logits.safetensors"))


def test_loaded_metadata(dream: LoadedModel) -> None:
    assert dream.kind == "dream"
    assert dream.name == "dream-tiny"
    assert dream.mask_token_id == 484
    assert dream.max_model_len == 512
    assert dream.tokenizer.stop_token_ids == {480, 482}


@pytest.mark.parametrize("k", [0, 1, 2])
def test_raw_logits_match_reference(
    dream: LoadedModel, cases: dict[str, torch.Tensor], k: int
) -> None:
    with torch.no_grad():
        out = dream.model(cases[f"input_ids_{k}"][None])
    assert out.logits.shape[-1] == 485
    assert (out.logits[0] - cases[f"logits_{k}"]).abs().max().item() <= TOL


def test_left_padded_batch_matches_unpadded(
    dream: LoadedModel, cases: dict[str, torch.Tensor]
) -> None:
    seqs = [cases[f"input_ids_{k}"] for k in range(3)]
    width = max(len(s) for s in seqs)
    ids = torch.full((3, width), PAD)
    mask = torch.zeros(3, width, dtype=torch.bool)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = True
    # Dream's convention: positions count real tokens only.
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = dream.model(ids, position_ids=positions, key_mask=mask)
    for row, seq in enumerate(seqs):
        got = out.logits[row, width - len(seq) :]
        assert (got - cases[f"logits_{row}"]).abs().max().item() <= TOL


def test_gqa_dual_cache_reproduces_full_forward(
    dream: LoadedModel, cases: dict[str, torch.Tensor]
) -> None:
    ids = cases["input_ids_1"][None]
    n, p, s = ids.shape[1], 30, 8
    with torch.no_grad():
        cache = slots_for(dream.model, [(0, 0, n, n)])
        full = dream.model(ids, cache=cache)
        # Two key/value heads for four query heads: the cache keeps the grouped shape.
        assert cache.store.keys[0].shape[1:] == (2, 256, 32)
        dual = dream.model(
            ids[:, p : p + s], cache=slots_for(dream.model, [(0, p, s, n)], cache.store)
        )
    assert (dual.logits - full.logits[:, p : p + s]).abs().max().item() <= TOL

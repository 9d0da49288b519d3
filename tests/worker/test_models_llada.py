"""LLaDA: logits parity with the reference implementation, and the cache forward API."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.worker.drive import slots_for
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
    n, p, s = ids.shape[1], 20, 8  # prefix, block [p, p + s), suffix after it
    with torch.no_grad():
        cache = slots_for(llada.model, [(1, 0, n, n)])
        full = llada.model(ids, cache=cache)
        assert cache.store.keys[0].shape == (4, 4, 256, 32)
        prefix = llada.model(
            ids[:, p:], cache=slots_for(llada.model, [(1, p, n - p, n)], cache.store)
        )
        dual = llada.model(
            ids[:, p : p + s], cache=slots_for(llada.model, [(1, p, s, n)], cache.store)
        )
    # Prefix cache: keys for the tokens after the block are recomputed, so the whole tail
    # matches; dual cache: the block sees the exact same keys as the full pass.
    assert (prefix.logits - full.logits[:, p:]).abs().max().item() <= TOL
    assert (dual.logits - full.logits[:, p : p + s]).abs().max().item() <= TOL


def test_cached_rows_of_any_slot_length_and_position_batch_as_alone(
    llada: LoadedModel, cases: dict[str, torch.Tensor]
) -> None:
    a, b = cases["input_ids_1"][None], cases["input_ids_0"][None]
    na, nb = a.shape[1], b.shape[1]
    with torch.no_grad():
        cache = slots_for(llada.model, [(2, 0, na, na)])
        llada.model(a, cache=cache)
        llada.model(b, cache=slots_for(llada.model, [(0, 0, nb, nb)], cache.store))
        # A dual-cache block of a (8 tokens at 20) and a prefix pass of b (from 10 on).
        alone_a = llada.model(
            a[:, 20:28], cache=slots_for(llada.model, [(2, 20, 8, na)], cache.store)
        )
        alone_b = llada.model(
            b[:, 10:], cache=slots_for(llada.model, [(0, 10, nb - 10, nb)], cache.store)
        )
        width = max(8, nb - 10)
        ids = torch.zeros(2, width, dtype=torch.long)
        ids[0, :8], ids[1, : nb - 10] = a[0, 20:28], b[0, 10:]
        pos = torch.zeros(2, width, dtype=torch.long)
        pos[0, :8], pos[1, : nb - 10] = torch.arange(20, 28), torch.arange(10, nb)
        # Both rows read their first nb - 10 positions (row a's last ones are padding).
        both = llada.model(
            ids,
            position_ids=pos,
            heads=torch.arange(nb - 10).expand(2, nb - 10),
            cache=slots_for(llada.model, [(2, 20, 8, na), (0, 10, nb - 10, nb)], cache.store),
        )
    assert both.logits.shape == (2, nb - 10, alone_a.logits.shape[-1])
    assert (both.logits[0, :8] - alone_a.logits[0]).abs().max().item() <= TOL
    assert (both.logits[1] - alone_b.logits[0]).abs().max().item() <= TOL


def test_a_cached_pass_takes_its_key_mask_from_the_cache(llada: LoadedModel) -> None:
    ids = torch.full((1, 6), 481)
    with torch.no_grad(), pytest.raises(ValueError, match="key mask"):
        llada.model(
            ids,
            key_mask=torch.ones(1, 6, dtype=torch.bool),
            cache=slots_for(llada.model, [(0, 0, 6, 6)]),
        )


def test_fully_masked_row_gives_no_nan(llada: LoadedModel) -> None:
    ids = torch.full((2, 6), 481)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1] = False
    with torch.no_grad():
        out = llada.model(ids, key_mask=mask)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", ["llada-tiny", "dream-tiny"])
def test_a_weight_replaced_after_load_is_the_one_a_pass_reads(name: str) -> None:
    """Blocks read their weights from the layers' live parameter dicts: a weight swapped in
    later, as quantization does, is used, exactly as one changed in place."""
    swapped, in_place = load_model(str(GOLDEN / name)).model, load_model(str(GOLDEN / name)).model
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        before = swapped(ids).logits
        for model, swap in ((swapped, True), (in_place, False)):
            for block in model.layers():
                for module in block.modules():
                    if isinstance(module, torch.nn.Linear):
                        scaled = module.weight * 1.5
                        if swap:
                            module.weight = torch.nn.Parameter(scaled, requires_grad=False)
                        else:
                            module.weight.copy_(scaled)
        after = swapped(ids).logits
        assert not torch.equal(after, before)
        assert torch.equal(after, in_place(ids).logits)


def test_rope_tables_of_repeated_positions_are_those_computed_afresh(llada: LoadedModel) -> None:
    """Passes repeat their positions (each step of a block): the tables kept from the last
    pass are those of its positions, and a pass at other positions gets its own."""
    rotary = llada.model.rotary
    a, b = torch.arange(5, 29)[None], torch.arange(7, 31)[None]
    for pos in (a, b, b.clone(), a, a[:, :20]):
        got = rotary.tables(pos, torch.float32)
        want = rotary._tables(pos, torch.float32)
        assert torch.equal(got.cos, want.cos) and torch.equal(got.sin, want.sin)
    assert rotary.tables(a, torch.float32) is rotary.tables(a.clone(), torch.float32)

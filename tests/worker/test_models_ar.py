"""Autoregressive fallback: transformers greedy parity and the shared forward contract."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.worker.drive import slots_for
from vdiff_worker.models import LoadedModel, load_model
from vdiff_worker.models.ar import CausalLM, SlotLayer

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
TOL = 1e-4


@pytest.fixture(scope="module")
def ar() -> LoadedModel:
    return load_model(str(GOLDEN / "ar-tiny"))


@pytest.fixture(scope="module")
def greedy_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads((GOLDEN / "cases" / "shared_apd.json").read_text())[
        "ar_greedy"
    ]
    return cases


def _model(loaded: LoadedModel) -> CausalLM:
    assert isinstance(loaded.model, CausalLM)
    return loaded.model


def test_loaded_metadata(ar: LoadedModel) -> None:
    assert ar.kind == "ar"
    assert ar.mask_token_id is None
    assert ar.max_model_len == 512
    assert not ar.model.training


def test_greedy_matches_transformers_generate(
    ar: LoadedModel, greedy_cases: list[dict[str, Any]]
) -> None:
    model = _model(ar)
    for case in greedy_cases:
        ids = case["prompt_ids"]
        store = slots_for(model, [(0, 0, len(ids), len(ids))]).store
        at, step = 0, torch.tensor([ids])
        out: list[int] = []
        with torch.no_grad():
            for _ in range(case["max_new_tokens"]):
                n = step.shape[1]
                logits = model(step, cache=slots_for(model, [(0, at, n, at + n)], store)).logits
                at += n
                step = logits[:, -1].argmax(-1, keepdim=True)
                out.append(int(step))
        assert out == case["output_ids"]


def test_cached_passes_of_different_lengths_batch_as_alone(
    ar: LoadedModel, greedy_cases: list[dict[str, Any]]
) -> None:
    a, b = greedy_cases[0], greedy_cases[3]
    pa, pb = len(a["prompt_ids"]), len(b["prompt_ids"])
    model = _model(ar)
    with torch.no_grad():
        full_a = model(torch.tensor([a["prompt_ids"] + a["output_ids"]]))
        full_b = model(torch.tensor([b["prompt_ids"] + b["output_ids"]]))
        cache = slots_for(model, [(1, 0, pa, pa)])
        model(torch.tensor([a["prompt_ids"]]), cache=cache)
        model(
            torch.tensor([b["prompt_ids"]]), cache=slots_for(model, [(3, 0, pb, pb)], cache.store)
        )
        # Row 0: a's first 4 answer tokens after its prompt; row 1: b's first 2 (padded).
        ids = torch.zeros(2, 4, dtype=torch.long)
        ids[0], ids[1, :2] = torch.tensor(a["output_ids"][:4]), torch.tensor(b["output_ids"][:2])
        both = model(
            ids, cache=slots_for(model, [(1, pa, 4, pa + 4), (3, pb, 2, pb + 2)], cache.store)
        )
    assert (both.logits[0] - full_a.logits[0, pa : pa + 4]).abs().max().item() <= TOL
    assert (both.logits[1, :2] - full_b.logits[0, pb : pb + 2]).abs().max().item() <= TOL


def test_attention_reads_the_slots_in_place(
    ar: LoadedModel, greedy_cases: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decode step writes its key into the slot and attends to a view of the slot: no
    copy of the sequence's cache is made for the pass."""
    model, ids = _model(ar), greedy_cases[0]["prompt_ids"]
    cache = slots_for(model, [(0, 0, len(ids), len(ids))])
    seen: list[torch.Tensor] = []
    update = SlotLayer.update

    def spy(self: SlotLayer, *args: Any, **kwargs: Any) -> Any:
        keys, values = update(self, *args, **kwargs)
        seen.append(keys)
        return keys, values

    monkeypatch.setattr(SlotLayer, "update", spy)
    with torch.no_grad():
        model(torch.tensor([ids]), cache=cache)
        step = slots_for(model, [(0, len(ids), 1, len(ids) + 1)], cache.store)
        model(torch.tensor([[7]]), cache=step)
    layers = model.kv_shape().layers
    assert len(seen) == 2 * layers
    for layer, keys in enumerate(seen[layers:]):
        slot = cache.store.keys[layer]
        assert keys.data_ptr() == slot.data_ptr()  # a view of slot 0, not a copy
        assert keys.shape[2] == len(ids) + 1
        assert slot[0, :, len(ids)].abs().sum() > 0  # the new key, written in place


def test_the_vocabulary_head_runs_from_the_first_position_read(
    ar: LoadedModel, greedy_cases: list[dict[str, Any]]
) -> None:
    """A prompt's pass reads one position: the head projects that one, not prompt x
    vocabulary, and its logits are those of the whole pass there (to the last bits: a
    one-row product sums in another order)."""
    model, ids = _model(ar), greedy_cases[0]["prompt_ids"]
    widths: list[int] = []
    hook = model.hf.lm_head.register_forward_hook(
        lambda _m, args, _out: widths.append(int(args[0].shape[1]))
    )
    P = len(ids)
    try:
        with torch.no_grad():
            full = model(torch.tensor([ids])).logits
            last = model(torch.tensor([ids]), heads=torch.tensor([[P - 1]])).logits
            cache = slots_for(model, [(0, 0, P, P)])
            window = model(torch.tensor([ids]), cache=cache, heads=torch.tensor([[P - 3, P - 1]]))
            none = model(torch.tensor([ids]), heads=torch.zeros(1, 0, dtype=torch.long)).logits
    finally:
        hook.remove()
    assert widths[:3] == [P, 1, 3]
    assert none.shape == (1, 0, full.shape[-1])  # a pass that reads no logits
    assert (last[0, 0] - full[0, P - 1]).abs().max().item() <= TOL
    assert (window.logits[0] - full[0, [P - 3, P - 1]]).abs().max().item() <= TOL


def test_left_padded_batch_matches_unpadded(
    ar: LoadedModel, greedy_cases: list[dict[str, Any]]
) -> None:
    seqs = [greedy_cases[0]["prompt_ids"], greedy_cases[3]["prompt_ids"]]
    width = max(len(s) for s in seqs)
    ids = torch.full((2, width), 480)
    mask = torch.zeros(2, width, dtype=torch.bool)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = True
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch = ar.model(ids, position_ids=positions, key_mask=mask)
        for row, seq in enumerate(seqs):
            alone = ar.model(torch.tensor([seq]))
            got = batch.logits[row, width - len(seq) :]
            assert (got - alone.logits[0]).abs().max().item() <= TOL

"""Autoregressive fallback: transformers greedy parity and the shared forward contract."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from vdiff_worker.models import LoadedModel, load_model
from vdiff_worker.models.ar import CausalLM

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
        logits, cache = model.step(torch.tensor([case["prompt_ids"]]))
        out: list[int] = []
        with torch.no_grad():
            for _ in range(case["max_new_tokens"]):
                token = logits[:, -1].argmax(-1, keepdim=True)
                out.append(int(token))
                logits, cache = model.step(token, cache)
        assert out == case["output_ids"]


def test_forward_with_kv_before_matches_full_pass(
    ar: LoadedModel, greedy_cases: list[dict[str, Any]]
) -> None:
    prompt, answer = greedy_cases[0]["prompt_ids"], greedy_cases[0]["output_ids"]
    with torch.no_grad():
        full = ar.model(torch.tensor([prompt + answer]))
        head = ar.model(torch.tensor([prompt]), return_kv=True)
        assert head.kv is not None and len(head.kv) == 3
        assert head.kv[0][0].shape == (1, 2, len(prompt), 24)
        tail = ar.model(torch.tensor([answer]), kv_before=head.kv, return_kv=True)
        with pytest.raises(ValueError, match="kv_after"):
            ar.model(torch.tensor([answer]), kv_before=head.kv, kv_after=head.kv)
    assert tail.kv is not None and tail.kv[0][0].shape[2] == len(answer)
    assert (tail.logits - full.logits[:, len(prompt) :]).abs().max().item() <= TOL


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

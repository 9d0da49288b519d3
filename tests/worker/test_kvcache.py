"""Cache slots: what a batched pass writes where, and what each row reads back."""

from __future__ import annotations

import pytest
import torch

from vdiff_worker.models.kvcache import SlotBatch, SlotStore


def _store() -> SlotStore:
    return SlotStore(
        layers=1,
        slots=4,
        kv_heads=2,
        length=12,
        head_dim=3,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )


@pytest.mark.parametrize("scatter", [False, True], ids=["slices", "scatter"])
def test_rows_write_their_real_tokens_at_their_positions(scatter: bool) -> None:
    store = _store()
    # Row 0: slot 3, 2 new tokens at 5 (keys 0..9); row 1: slot 1, 4 new tokens at 0.
    batch = SlotBatch(
        store,
        [3, 1],
        [5, 0],
        [2, 4],
        [9, 4],
        scatter=scatter,
    )
    k = torch.arange(2 * 2 * 4 * 3, dtype=torch.float32).view(2, 2, 4, 3) + 1
    keys, values = batch.write_and_read(0, k, -k)
    assert torch.equal(store.keys[0][3, :, 5:7], k[0, :, :2])
    assert torch.equal(store.keys[0][1, :, 0:4], k[1])
    assert torch.equal(store.values[0][1, :, 0:4], -k[1])
    # Row 0's padding (its tokens 2 and 3) went nowhere; nothing else was touched.
    assert store.keys[0][3, :, 7:].abs().sum() == 0 and store.keys[0][[0, 2]].abs().sum() == 0
    assert keys.shape == (2, 2, 9, 3)  # each row reads its slot up to the longest
    assert torch.equal(keys[0], store.keys[0][3, :, :9])
    assert torch.equal(keys[1], store.keys[0][1, :, :9])
    assert batch.key_mask is not None
    assert batch.key_mask.tolist()[1] == [True] * 4 + [False] * 5


def test_rows_of_one_token_each_write_it_at_their_positions() -> None:
    store = _store()
    batch = SlotBatch(store, [2, 0, 3], [7, 4, 0], [1, 1, 1], [8, 5, 1])
    k = torch.arange(3 * 2 * 1 * 3, dtype=torch.float32).view(3, 2, 1, 3) + 1
    batch.write(0, k, -k)
    for row, (slot, at) in enumerate([(2, 7), (0, 4), (3, 0)]):
        assert torch.equal(store.keys[0][slot, :, at], k[row, :, 0])
        assert torch.equal(store.values[0][slot, :, at], -k[row, :, 0])
    assert store.keys[0].abs().sum() == k.abs().sum()  # nothing else was touched


def test_consecutive_slots_read_a_view_and_no_mask_when_all_see_all() -> None:
    store = _store()
    batch = SlotBatch(
        store,
        [1, 2],
        [0, 0],
        [3, 3],
        [6, 6],
    )
    keys, _ = batch.read(0, 6)
    assert keys.data_ptr() == store.keys[0][1].data_ptr()  # a view, no copy
    assert batch.key_mask is None


def test_a_slot_can_be_taken_only_once() -> None:
    store = _store()
    taken = {store.take() for _ in range(4)}
    assert taken == {0, 1, 2, 3} and store.take() is None
    store.give(2)
    store.give(0)
    assert store.take() == 0 and store.take() == 2  # the lowest free first

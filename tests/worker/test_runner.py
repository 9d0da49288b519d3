"""The model runner: which passes share a call, cache slots, the counters."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import GOLDEN
from tests.worker.drive import runner
from vdiff_worker.decoding.base import Cached, Forward, full_sequence
from vdiff_worker.models import LoadedModel, load_model
from vdiff_worker.runner import CacheMemoryError, Call


@pytest.fixture(scope="module")
def llada() -> LoadedModel:
    return load_model(str(GOLDEN / "llada-tiny"))


def _plain(width: int) -> Forward:
    return full_sequence(torch.full((width - 4,), 481), torch.full((4,), 482), (0, width))


def test_passes_of_close_widths_share_a_call_and_far_ones_do_not(llada: LoadedModel) -> None:
    run = runner({"main": llada.model})
    with torch.no_grad():
        outs = run.run([Call(_plain(w)) for w in (40, 36, 30)])
        assert (run.calls, run.rows) == (1, 3)
        assert [o.logits.shape[1] for o in outs] == [40, 36, 30]
        run.run([Call(_plain(w)) for w in (200, 12, 190, 8)])  # 200 and 190; 12 and 8
        assert (run.calls, run.rows) == (3, 7)
        # Passes this narrow share a call whatever their widths; wider ones do not.
        outs = run.run([Call(_plain(w)) for w in (60, 6, 20)])
        assert (run.calls, run.rows) == (4, 10)
        assert [o.logits.shape[1] for o in outs] == [60, 6, 20]
        run.run([Call(_plain(w)) for w in (100, 40)])
    assert (run.calls, run.rows) == (6, 12)


def test_passes_reading_spans_of_different_widths_share_a_call_and_get_their_own(
    llada: LoadedModel,
) -> None:
    """Each row reads as many positions as the widest span (at least MIN_QUERIES); a pass gets back
    its own span's logits, equal to what it gets alone, also for two positions at its end."""
    gen = torch.Generator().manual_seed(3)

    def plain(width: int, span: tuple[int, int]) -> Forward:
        ids = torch.randint(0, 480, (width,), generator=gen)
        return full_sequence(ids[:8], ids[8:], span)

    passes = [plain(40, (8, 40)), plain(36, (34, 36)), plain(30, (10, 18))]
    run = runner({"main": llada.model})
    with torch.no_grad():
        alone = [run.run([Call(f)])[0].logits for f in passes]
        together = run.run([Call(f) for f in passes])
    assert run.calls == len(passes) + 1
    for a, t, f in zip(alone, together, passes, strict=True):
        lo, hi = f.span
        assert t.logits.shape == (1, hi - lo, a.shape[-1])
        # Padding to a common width moves the last bits (as for any batched call).
        assert (t.logits - a).abs().max().item() <= 1e-4


def test_a_pass_picking_positions_gets_theirs_in_order(llada: LoadedModel) -> None:
    """``picks`` returns the logits of those positions, in the order given, beside a pass
    reading a span in the same call."""
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 480, (40,), generator=gen)
    spanned = full_sequence(ids[:8], ids[8:], (8, 40))
    picked = full_sequence(ids[:8], ids[8:], (8, 40), picks=torch.tensor([30, 9, 21]))
    run = runner({"main": llada.model})
    with torch.no_grad():
        wide, narrow = run.run([Call(spanned), Call(picked)])
    assert run.calls == 1
    assert narrow.logits.shape == (1, 3, wide.logits.shape[-1])
    assert (narrow.logits[0] - wide.logits[0, [22, 1, 13]]).abs().max().item() <= 1e-5


def test_cached_and_plain_passes_are_separate_calls(llada: LoadedModel) -> None:
    run = runner({"main": llada.model})
    slots = run.acquire(frozenset({"main"}))
    assert slots is not None
    cached = full_sequence(
        torch.full((20,), 481), torch.full((8,), 482), (20, 28), Cached(write=0, keys=28)
    )
    with torch.no_grad():
        plain = full_sequence(torch.full((20,), 481), torch.full((8,), 482), (20, 28))
        outs = run.run([Call(plain), Call(cached, slots["main"])])
    assert run.calls == 2
    # Same tokens: the cached pass (over its own keys only) computes what the plain one does.
    assert (outs[1].logits - outs[0].logits).abs().max().item() <= 1e-5


def test_slots_run_out_and_come_back(llada: LoadedModel) -> None:
    run = runner({"main": llada.model}, slots=2)
    a, b = run.acquire(frozenset({"main"})), run.acquire(frozenset({"main"}))
    assert a is not None and b is not None and a != b
    assert run.acquire(frozenset({"main"})) is None  # the next sequence waits
    run.release(a)
    assert run.acquire(frozenset({"main"})) == a
    assert run.acquire(frozenset()) == {}  # a sequence without a cache needs none


def test_a_pass_beyond_the_slot_is_refused(llada: LoadedModel) -> None:
    run = runner({"main": llada.model}, max_len=16)
    slots = run.acquire(frozenset({"main"}))
    assert slots is not None
    call = full_sequence(
        torch.full((20,), 481), torch.full((4,), 482), (0, 24), Cached(write=0, keys=24)
    )
    with torch.no_grad(), pytest.raises(ValueError, match="beyond the cache"):
        run.run([Call(call, slots["main"])])


def test_a_cache_that_cannot_be_allocated_fails_alone_with_a_clear_error(
    llada: LoadedModel,
) -> None:
    run = runner({"main": llada.model}, slots=1 << 20, max_len=1 << 20)
    with pytest.raises(CacheMemoryError, match="lower --max-num-seqs"):
        run.acquire(frozenset({"main"}))
    assert run.acquire(frozenset()) == {}  # passes without a cache still run

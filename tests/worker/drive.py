"""Run one strategy as the engine does, through the model runner, without a server."""

from __future__ import annotations

from collections.abc import Callable

import torch

from vdiff_worker.decoding.base import Fetch, Forward, Strategy
from vdiff_worker.metrics import WorkerMetrics
from vdiff_worker.models.kvcache import SlotBatch, SlotStore
from vdiff_worker.runner import Call, Runner


def runner(models: dict[str, torch.nn.Module], slots: int = 2, max_len: int = 512) -> Runner:
    return Runner(models, slots=slots, max_len=max_len, metrics=WorkerMetrics("test", "drive"))


def drive(
    strategy: Strategy,
    models: dict[str, torch.nn.Module],
    on_pass: list[int] | None = None,
    until: Callable[[torch.Tensor], bool] | None = None,
    run: Runner | None = None,
) -> int:
    """Run a strategy to its end or until `until` holds for the canvas; returns the rows
    computed. `on_pass` collects the tokens committed after each call."""
    run = run or runner(models)
    slots = run.acquire(strategy.cached_models())
    assert slots is not None
    canvas, mask = strategy.ctx.canvas, strategy.ctx.mask_id
    steps, rows = strategy.run(), 0
    call: Forward | None = next(steps, None)  # type: ignore[assignment]
    try:
        with torch.no_grad():
            while call is not None and not (until is not None and until(canvas)):
                rows += int(call.input_ids.shape[0])
                before = int((canvas != mask).sum())
                (out,) = run.run([Call(call, slots.get(call.model))])
                try:
                    step = steps.send(out)
                    while isinstance(step, Fetch):
                        step = steps.send(run.fetch([step])[0])
                    call = step
                except StopIteration:
                    call = None
                if on_pass is not None:
                    on_pass.append(int((canvas != mask).sum()) - before)
    finally:
        run.release(slots)
    return rows


def slots_for(
    model: torch.nn.Module,
    rows: list[tuple[int, int, int, int]],
    store: SlotStore | None = None,
    slots: int = 4,
    length: int = 256,
) -> SlotBatch:
    """A SlotBatch of rows (slot, start, new tokens, keys), in `store` or a new one."""
    if store is None:
        shape = model.kv_shape()  # type: ignore[operator]
        store = SlotStore(
            shape.layers,
            slots,
            shape.kv_heads,
            length,
            shape.head_dim,
            torch.float32,
            torch.device("cpu"),
        )
    cols = list(zip(*rows))
    return SlotBatch(store, *(list(c) for c in cols))

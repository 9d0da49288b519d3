"""The model runner: one step's model calls, batched; cache slots; the memory guard.

Passes that one model call can serve together share it, padded to a common width:

- plain passes of a model (no cache), whatever their lengths;
- cached passes of a model, each row writing to and attending to its own slot, at any
  position and with a cache of any length (vdiff_worker.models.kvcache);
- block-causal passes (LLaDA2) with the others of their kind: each query's key count is laid
  out on the host, so rows at different blocks, with different block lengths, share a call.

Only these split a step into several calls: a different model (APD's verifier), a pass with a
cache against one without (a plain row has no slot to attend through), a model's own
``generate`` (it runs a whole sampler), and widths far apart: a pass shares a call only with
passes at most twice as wide (CPU passes are compute-bound: a 32-token block pass padded to a
200-token full pass costs six times its work), unless all are narrow (``NARROW`` tokens or
fewer: a verifier's 4-token pass padded to 16 costs what the call costs anyway).

A call is laid out on the host (the strategies' passes are host tensors) and copied to the
model's device once; after the step, what the strategies read back from the logits is
copied to the host in one transfer (``fetch``), so a step waits for the device once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from loguru import logger
from torch import Tensor, nn

from vdiff_worker.decoding.base import Fetch, Forward
from vdiff_worker.metrics import WorkerMetrics
from vdiff_worker.models.base import ModelOutput
from vdiff_worker.models.kvcache import SlotBatch, SlotStore

SHAPE_BUCKET = 32  # with shape_buckets, padded plain passes are a multiple of this long
# Passes at most this wide share a call whatever their widths: they cost a call's fixed
# overheads far more than their tokens.
NARROW = 64
# The fewest positions a call reads logits at: with fewer rows MKL's matrix kernels sum in
# another order (on an AVX-512/AMX Xeon: below 16 rows for a 384-wide input, at 4 rows or
# fewer for a 128-wide one), and the last layer's bits would differ from a pass reading all.
MIN_QUERIES = 16


class CacheMemoryError(RuntimeError):
    """The cache slots of a model could not be allocated."""


@dataclass
class Call:
    """A pass and the cache slot of its sequence for the pass's model (if it uses one)."""

    forward: Forward
    slot: int | None = None


class Runner:
    def __init__(
        self,
        models: dict[str, nn.Module],
        slots: int,
        max_len: int,
        metrics: WorkerMetrics,
        shape_buckets: bool = False,
    ) -> None:
        self.models = models
        self.slots = slots
        self.max_len = max_len
        self.metrics = metrics
        # Pad plain passes to bucketed shapes (rows to a power of two, length to a multiple of
        # SHAPE_BUCKET), so a CUDA-graph compiled model records few graphs.
        self.shape_buckets = shape_buckets
        self.stores: dict[str, SlotStore] = {}
        self.calls = 0  # model calls since start
        self.rows = 0  # rows those calls carried
        # Fault-injection hook for tests of the memory guard: a model call over this many
        # tokens (rows x length) raises OutOfMemoryError as a real device would.
        self._oom_tokens = int(os.environ.get("VDIFF_FAULT_OOM_TOKENS", "0"))

    # ---- cache slots -------------------------------------------------------------------
    def _store(self, model: str) -> SlotStore:
        """The model's slots, allocated when a sequence first needs one."""
        if model not in self.stores:
            module = self.models[model]
            shape = module.kv_shape()  # type: ignore[operator]
            # Keys come out in the activations' dtype, the float parameters' one.
            weight = next(p for p in module.parameters() if p.is_floating_point())
            try:
                store = SlotStore(
                    shape.layers,
                    self.slots,
                    shape.kv_heads,
                    self.max_len,
                    shape.head_dim,
                    weight.dtype,
                    weight.device,
                )
            # A device says OutOfMemoryError; a host allocator that cannot, RuntimeError.
            except (torch.OutOfMemoryError, RuntimeError) as err:
                raise CacheMemoryError(
                    f"cannot allocate the KV cache of {self.slots} sequences x {self.max_len} "
                    f"positions for the {model} model; lower --max-num-seqs or --max-model-len"
                ) from err
            logger.info(
                "{} KV cache: {} slots x {} positions, {:.1f} MiB",
                model,
                self.slots,
                self.max_len,
                store.nbytes / 2**20,
            )
            self.stores[model] = store
        return self.stores[model]

    def acquire(self, models: frozenset[str]) -> dict[str, int] | None:
        """A slot of each model, or None (nothing taken) while one of them has none free."""
        stores = {m: self._store(m) for m in sorted(models)}
        if any(not s.free for s in stores.values()):
            return None
        return {m: s.take() for m, s in stores.items()}  # type: ignore[misc]

    def release(self, slots: dict[str, int]) -> None:
        for model, slot in slots.items():
            self.stores[model].give(slot)

    # ---- one step's calls ----------------------------------------------------------------
    def run(self, calls: list[Call]) -> list[ModelOutput]:
        results: list[ModelOutput | None] = [None] * len(calls)
        groups: dict[tuple[str, bool, bool], list[int]] = {}
        for i, c in enumerate(calls):
            f = c.forward
            groups.setdefault((f.model, f.cached is not None, bool(f.new_tokens)), []).append(i)
        for (_, cached, own_generate), members in groups.items():
            parts = (
                [[i] for i in members]
                if own_generate
                else _by_width([calls[i] for i in members], members)
            )
            for part in parts:
                if cached:  # in slot order: consecutive slots are read as a view, not copied
                    part = sorted(part, key=lambda i: calls[i].slot or 0)
                for i, out in zip(part, self._batched([calls[i] for i in part])):
                    results[i] = out
        return results  # type: ignore[return-value]

    def fetch(self, fetches: list[Fetch]) -> list[tuple[Tensor, ...]]:
        """Host copies of every fetch's tensors, in one device-to-host copy: they travel as
        one float64 vector (exact for booleans, token ids and every float dtype)."""
        tensors = [t for f in fetches for t in f.tensors]
        device = next((t.device for t in tensors if t.device.type != "cpu"), None)
        if device is not None:
            flat = torch.cat([t.reshape(-1).to(device, torch.float64) for t in tensors]).cpu()
            parts = flat.split([t.numel() for t in tensors])
            tensors = [p.view(t.shape).to(t.dtype) for p, t in zip(parts, tensors)]
        out, at = [], 0
        for f in fetches:
            out.append(tuple(tensors[at : at + len(f.tensors)]))
            at += len(f.tensors)
        return out

    def _batched(self, calls: list[Call]) -> list[ModelOutput]:
        """One padded call; on out-of-memory, split the batch in halves and retry each."""
        try:
            return self._call(calls)
        except torch.OutOfMemoryError:
            if len(calls) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            mid = len(calls) // 2
            logger.warning("out of memory on a batch of {}; splitting", len(calls))
            return self._batched(calls[:mid]) + self._batched(calls[mid:])

    def _guard(self, rows: int, length: int) -> None:
        if self._oom_tokens and rows * length > self._oom_tokens:
            raise torch.OutOfMemoryError(f"injected: {rows}x{length} tokens")

    def _count(self, rows: int) -> None:
        self.calls += 1
        self.rows += rows
        self.metrics.call_rows.observe(rows)

    def _call(self, calls: list[Call]) -> list[ModelOutput]:
        first = calls[0].forward
        model: Any = self.models[first.model]
        device = next(model.parameters()).device
        if first.new_tokens:  # a transformers model with a sampler of its own
            self._guard(*first.input_ids.shape)
            torch.manual_seed(first.seed)
            out = model.generate(first.input_ids.to(device), max_new_tokens=first.new_tokens)
            self._count(int(first.input_ids.shape[0]))
            tokens = out.sequences[:, first.input_ids.shape[1] :]
            return [ModelOutput(logits=tokens.new_empty(0), tokens=tokens)]
        width = max(int(c.forward.input_ids.shape[1]) for c in calls)
        rows_in = sum(int(c.forward.input_ids.shape[0]) for c in calls)
        filler = 0
        cached = first.cached is not None
        if self.shape_buckets and not cached:
            width = -(-width // SHAPE_BUCKET) * SHAPE_BUCKET
            filler = (1 << (rows_in - 1).bit_length()) - rows_in
        ids, pos, heads, limits = [], [], [], []
        lengths: list[int] = []
        causal = any(c.forward.block for c in calls)
        # Every row reads the same number of positions, at least MIN_QUERIES (those below
        # its span are its own tokens too, read and dropped).
        window = min(width, max(MIN_QUERIES, *(c.forward.reads for c in calls)))
        cols = []  # per call, the columns of its logits among the window's
        for c in calls:
            f = c.forward
            rows, length = f.input_ids.shape
            ids.append(_padded(f.input_ids, width))
            pos.append(_padded(f.position_ids, width))
            if causal:
                limits.append(_limits(f, pos[-1]))
            if f.picks is not None:  # the picks, then the last one again up to the window
                picks = f.picks
                if picks.numel() < window:
                    picks = picks[torch.arange(window).clamp(max=picks.numel() - 1)]
                heads.append(picks.expand(rows, window))
                cols.append((0, f.reads))
            else:
                start = min(f.span[0], width - window)
                heads.append(torch.arange(start, start + window).expand(rows, window))
                cols.append((f.span[0] - start, f.span[1] - start))
            lengths += [int(length)] * rows
        if filler:  # rows of padding only; their outputs are dropped
            ids.append(first.input_ids.new_zeros(filler, width))
            pos.append(first.input_ids.new_zeros(filler, width))
            limits.append(first.input_ids.new_zeros(filler, width))
            heads.append(torch.arange(window).expand(filler, window))
            lengths += [0] * filler
        self._guard(rows_in + filler, width)
        key_mask, cache = None, None
        if cached:
            cache = self._slots(calls, lengths)
        elif min(lengths) < width and not causal:
            key_mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).to(device)
        # Only block-causal models take per-query key counts.
        extra = {"limits": torch.cat(limits).to(device)} if causal else {}
        out = model(
            _joined(ids).to(device),
            position_ids=_joined(pos).to(device),
            key_mask=key_mask,
            cache=cache,
            heads=_joined(heads),  # the model moves it; a host copy is free to read
            **extra,
        )
        self._count(rows_in + filler)
        results, at = [], 0
        for c, (lo, hi) in zip(calls, cols, strict=True):
            rows = int(c.forward.input_ids.shape[0])
            logits = out.logits[at : at + rows, lo:hi]
            results.append(ModelOutput(logits=logits))
            at += rows
        return results

    def _slots(self, calls: list[Call], lengths: list[int]) -> SlotBatch:
        store = self.stores[calls[0].forward.model]
        slots, write, keys = [], [], []
        for c in calls:
            assert c.slot is not None and c.forward.cached is not None
            if c.forward.input_ids.shape[0] != 1:
                raise ValueError("a cached pass has one row: its sequence's slot")
            slots.append(c.slot)
            write.append(c.forward.cached.write)
            keys.append(c.forward.cached.keys)
        return SlotBatch(store, slots, write, lengths, keys)


def _padded(x: Tensor, width: int) -> Tensor:
    """``x`` [R, L] padded with zeros to ``width`` columns (itself when it is that wide)."""
    pad = width - int(x.shape[1])
    return x if pad == 0 else torch.nn.functional.pad(x, (0, pad))


def _joined(parts: list[Tensor]) -> Tensor:
    """The calls' rows as one tensor (a lone call's own: a pass of one sequence copies
    nothing)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _limits(f: Forward, positions: Tensor) -> Tensor:
    """Each query's key count ([rows, width], padding included): the pass's keys (its own
    tokens, or its slot up to ``cached.keys``), and with ``block`` no key past the end of the
    query's block."""
    keys = f.cached.keys if f.cached is not None else int(f.input_ids.shape[1])
    if not f.block:
        return torch.full_like(positions, keys)
    return ((positions // f.block + 1) * f.block).clamp(max=keys)


def _by_width(calls: list[Call], index: list[int]) -> list[list[int]]:
    """Split passes into groups padded to their widest, each pass at least half as wide as
    its group's widest (padding at most doubles a row's work), or all of them NARROW."""
    order = sorted(range(len(calls)), key=lambda i: -int(calls[i].forward.input_ids.shape[1]))
    groups: list[list[int]] = []
    widest = 0
    for i in order:
        w = int(calls[i].forward.input_ids.shape[1])
        if groups and (2 * w >= widest or widest <= NARROW):
            groups[-1].append(index[i])
        else:
            groups.append([index[i]])
            widest = w
    # Calls keep their submission order inside a group (the results are matched by index).
    return [sorted(g) for g in groups]

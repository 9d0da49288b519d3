"""Keys and values in preallocated per-sequence slots, written in place.

A slot holds one sequence's keys and values at their absolute positions (prompt, then canvas),
after RoPE. A cached pass writes its new tokens' keys at their positions and attends to the
slot's first ``keys`` positions, which now hold the new keys where it wrote and the cached ones
elsewhere. That one rule serves every cache the samplers use: Fast-dLLM's prefix and dual
caches (a block's pass rewrites the block, or the block and what follows), APD's windowed
diffusion cache and the causal verifier's and autoregressive decoder's prefix caches.

Rows of one batched call may use any slots, at any positions, with caches of any length: the
store gathers each row's keys up to the longest, and a key mask hides the rest. Where each
row writes and reads is given as host integers, so laying a call out never waits for the
device.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

KVPair = tuple[Tensor, Tensor]


class SlotStore:
    """Per layer, keys and values of ``slots`` sequences of up to ``length`` positions."""

    def __init__(
        self,
        layers: int,
        slots: int,
        kv_heads: int,
        length: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (slots, kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots = slots
        self.length = length
        # The lowest free slot goes first, so the slots in use stay packed at the front and a
        # call over them, in slot order, reads a view of the store more often than a copy.
        self.free = list(range(slots))

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def take(self) -> int | None:
        """A free slot, or None when all are in use."""
        return heapq.heappop(self.free) if self.free else None

    def give(self, slot: int) -> None:
        heapq.heappush(self.free, slot)


@dataclass
class SlotBatch:
    """How the rows of one model call use their slots.

    Row i writes its first ``lengths[i]`` new tokens at slot positions ``start[i]`` onwards
    and attends to slot positions ``[0, keys[i])``.
    """

    store: SlotStore
    slots: list[int]
    start: list[int]
    lengths: list[int]
    keys: list[int]

    # None: by device. Each row writes a slice in place on a CPU (a copy per row beats a
    # scatter there); on a GPU several rows scatter in one kernel, not a launch per row.
    scatter: bool | None = None

    def __post_init__(self) -> None:
        device = self.store.device
        rows = len(self.slots)
        # One token a row (autoregressive decoding): one indexed write on any device.
        self._single = rows > 1 and min(self.lengths) == max(self.lengths) == 1
        if self.scatter is None:
            self.scatter = rows > 1 and device.type != "cpu" and not self._single
        if self.scatter:
            # Built on the host, copied over once.
            start, lengths = torch.tensor(self.start), torch.tensor(self.lengths)
            col = torch.arange(max(self.lengths))
            valid = col[None, :] < lengths[:, None]  # [B, L]: real new tokens
            src_rows = torch.arange(rows)[:, None].expand_as(valid)[valid]
            dst_slots = torch.tensor(self.slots)[:, None].expand_as(valid)[valid]
            self._src = (src_rows.to(device), col[None, :].expand_as(valid)[valid].to(device))
            self._dst = (dst_slots.to(device), (start[:, None] + col[None, :])[valid].to(device))
        self.span = max(self.keys)
        if self.span > self.store.length:
            raise ValueError(
                f"a pass reaches position {self.span}, beyond the cache's {self.store.length}"
            )
        # Rows in consecutive slots read a view of the store; others gather a copy.
        first = self.slots[0]
        self._first = first if self.slots == list(range(first, first + rows)) else None
        # [B, K], or None when every row attends to all of them: an unmasked call runs the
        # same kernel a lone pass does.
        self.key_mask: Tensor | None = None
        if min(self.keys) < self.span:
            keys = torch.tensor(self.keys)
            self.key_mask = (torch.arange(self.span)[None, :] < keys[:, None]).to(device)

    @cached_property
    def start_ids(self) -> Tensor:
        """[B]: each row's first new slot position, on the device."""
        return torch.tensor(self.start).to(self.store.device)

    @cached_property
    def _index(self) -> Tensor:
        return torch.tensor(self.slots).to(self.store.device)

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Store the real rows of the new [B, H_kv, L, D] keys and values in place."""
        ks, vs = self.store.keys[layer], self.store.values[layer]
        if self._single:
            ks[self._index, :, self.start_ids] = k[:, :, 0]
            vs[self._index, :, self.start_ids] = v[:, :, 0]
            return
        if not self.scatter:
            for row, (slot, start, n) in enumerate(zip(self.slots, self.start, self.lengths)):
                ks[slot, :, start : start + n] = k[row, :, :n]
                vs[slot, :, start : start + n] = v[row, :, :n]
            return
        ks[self._dst[0], :, self._dst[1]] = k.transpose(1, 2)[self._src]
        vs[self._dst[0], :, self._dst[1]] = v.transpose(1, 2)[self._src]

    def write_and_read(self, layer: int, k: Tensor, v: Tensor) -> KVPair:
        """Store the new keys and values; the keys each row attends to."""
        self.write(layer, k, v)
        return self.read(layer, self.span)

    def read(self, layer: int, span: int) -> KVPair:
        """Each row's slot positions [0, span)."""
        ks, vs = self.store.keys[layer], self.store.values[layer]
        if self._first is not None:
            rows = slice(self._first, self._first + len(self.slots))
            return ks[rows, :, :span], vs[rows, :, :span]
        return ks[:, :, :span].index_select(0, self._index), vs[:, :, :span].index_select(
            0, self._index
        )

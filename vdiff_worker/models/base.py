"""The forward contract every diffusion model in vdiff implements.

One call serves every pass: without a cache it attends over its own tokens (``key_mask``
hides padding); with a :class:`~vdiff_worker.models.kvcache.SlotBatch` each row writes its
keys into its slot and attends to the slot (prefix, dual and windowed caches alike). Cached
keys are stored after RoPE, so reusing them never needs their positions again. ``heads``
([B, W], positions within each row; indices, since a boolean mask would make the device
report how many it selects; on the host or the device, the model moves it) picks the
positions whose logits are wanted: a sampler reads a block, not the whole canvas times the
vocabulary.

``limits`` gives each query its own key count: query (b, i) attends to keys [0, limits[b, i])
(input positions without a cache, slot positions with one). That is how block-causal models
(LLaDA2) attend, a block seeing itself and the blocks before it; it replaces the key mask.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vdiff_worker.models.kvcache import SlotBatch
from vdiff_worker.models.layers import RopeTables, Rotary


@dataclass
class ModelOutput:
    logits: Tensor  # [B, L, V] in the model dtype; [B, W, V] (the W positions) with heads
    tokens: Tensor | None = None  # [B, N]: what a model's own whole-sequence generate produced


@dataclass(frozen=True)
class KVShape:
    """What one sequence's cache slot holds per position."""

    layers: int
    kv_heads: int
    head_dim: int


class AttentionBlock(nn.Module, abc.ABC):
    """One transformer layer; with a cache it writes and reads its layer of the slots.

    With ``rows`` ([B, W]: the last layer, when only some positions' logits are wanted) every
    position still writes its keys and values, but only those rows' queries attend and what
    follows runs on them alone ([B, W, D] out): the other positions' outputs would never be
    read."""

    @abc.abstractmethod
    def forward(
        self,
        h: Tensor,
        rope: RopeTables,
        key_mask: Tensor | None,
        cache: SlotBatch | None,
        layer: int,
        rows: Tensor | None = None,
    ) -> Tensor: ...


class BidirectionalLM(nn.Module, abc.ABC):
    """Shared forward of the encoder-style (non-causal) diffusion language models."""

    rotary: Rotary

    @abc.abstractmethod
    def embed(self, input_ids: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def layers(self) -> Sequence[AttentionBlock]: ...

    @abc.abstractmethod
    def head(self, h: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def kv_shape(self) -> KVShape: ...

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        key_mask: Tensor | None = None,
        cache: SlotBatch | None = None,
        heads: Tensor | None = None,
        limits: Tensor | None = None,
    ) -> ModelOutput:
        batch, length = input_ids.shape
        if position_ids is None:  # the new tokens sit where they are written
            position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)
            if cache is not None:
                position_ids = position_ids + cache.start_ids[:, None]
        if limits is not None:
            if key_mask is not None:
                raise ValueError("pass either limits or a key mask")
            if limits.shape != (batch, length):
                raise ValueError(f"limits has shape {tuple(limits.shape)}, want {(batch, length)}")
            keys = cache.span if cache is not None else length
            # At least one key each: a query of pure padding would softmax to NaN (its
            # output is never read).
            seen = torch.arange(keys, device=limits.device) < limits.clamp(min=1)[..., None]
            key_mask = seen[:, None]  # [B, 1, L, K]
        elif cache is not None:
            if key_mask is not None:
                raise ValueError("a cached pass takes its key mask from the cache")
            key_mask = cache.key_mask
        elif key_mask is not None and key_mask.shape != (batch, length):
            raise ValueError(f"key_mask has shape {tuple(key_mask.shape)}, want {(batch, length)}")
        if key_mask is not None and key_mask.dim() == 2:
            # A row with every key masked (pure padding) would softmax to NaN; let it see
            # everything instead: its output is never read.
            key_mask = (key_mask | ~key_mask.any(dim=-1, keepdim=True))[:, None, None, :]
        if heads is not None:
            if heads.dim() != 2 or heads.shape[0] != batch:
                raise ValueError(f"heads has shape {tuple(heads.shape)}, want ({batch}, W)")
            heads = heads.to(input_ids.device)
        h = self.embed(input_ids)
        rope = self.rotary.tables(position_ids, h.dtype)
        layers = self.layers()
        last = len(layers) - 1
        for i, block in enumerate(layers):
            # forward, not the module call: no hooks are used, and a compiled region
            # replaces the instance's forward, which this finds all the same.
            h = block.forward(h, rope, key_mask, cache, i, heads if i == last else None)
        return ModelOutput(logits=self.head(h))

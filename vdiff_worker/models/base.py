"""The forward contract every diffusion model in vdiff implements.

One call serves all cache modes: no cache (no kv given), Fast-dLLM prefix cache
(``kv_before`` only) and dual cache (``kv_before`` and ``kv_after``). Cached keys are
stored after RoPE, so reusing them never needs their positions again.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vdiff_worker.models.layers import KVPair, RopeTables, Rotary

KVCache = list[KVPair]


@dataclass
class ModelOutput:
    logits: Tensor  # [B, L, V] in the model dtype
    kv: KVCache | None  # per layer (k, v) of the L new tokens, [B, H_kv, L, D], k after RoPE
    tokens: Tensor | None = None  # [B, N]: what a model's own whole-sequence generate produced


class AttentionBlock(nn.Module, abc.ABC):
    """One transformer layer that attends to cached keys around its new tokens."""

    @abc.abstractmethod
    def forward(
        self,
        h: Tensor,
        rope: RopeTables,
        key_mask: Tensor | None,
        before: KVPair | None,
        after: KVPair | None,
    ) -> tuple[Tensor, KVPair]: ...


class BidirectionalLM(nn.Module, abc.ABC):
    """Shared forward of the encoder-style (non-causal) diffusion language models."""

    rotary: Rotary

    @abc.abstractmethod
    def embed(self, input_ids: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def layers(self) -> Sequence[AttentionBlock]: ...

    @abc.abstractmethod
    def head(self, h: Tensor) -> Tensor: ...

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        key_mask: Tensor | None = None,
        kv_before: KVCache | None = None,
        kv_after: KVCache | None = None,
        return_kv: bool = False,
    ) -> ModelOutput:
        blocks = self.layers()
        n_before = _cached_len(kv_before, len(blocks), "kv_before")
        n_after = _cached_len(kv_after, len(blocks), "kv_after")
        batch, length = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(
                n_before, n_before + length, device=input_ids.device
            ).expand(batch, length)
        if key_mask is not None:
            want = n_before + length + n_after
            if key_mask.shape != (batch, want):
                raise ValueError(
                    f"key_mask has shape {tuple(key_mask.shape)}, want {(batch, want)}"
                )
            # A row with every key masked (pure padding) would softmax to NaN; let it see
            # everything instead: its output is never read.
            key_mask = (key_mask | ~key_mask.any(dim=-1, keepdim=True))[:, None, None, :]
        h = self.embed(input_ids)
        rope = self.rotary.tables(position_ids, h.dtype)
        new_kv: KVCache = []
        for i, block in enumerate(blocks):
            before = kv_before[i] if kv_before is not None else None
            after = kv_after[i] if kv_after is not None else None
            h, kv = block(h, rope, key_mask, before, after)
            if return_kv:
                new_kv.append(kv)
        return ModelOutput(logits=self.head(h), kv=new_kv if return_kv else None)


def _cached_len(cache: KVCache | None, n_layers: int, what: str) -> int:
    if cache is None:
        return 0
    if len(cache) != n_layers:
        raise ValueError(f"{what} has {len(cache)} layers, the model has {n_layers}")
    return int(cache[0][0].shape[2])

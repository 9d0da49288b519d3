"""Autoregressive fallback: any transformers causal LM behind vdiff's forward contract.

``forward`` speaks the same contract as the diffusion models (causal attention, cached
keys before the new tokens), so an AR model can serve as APD's verifier. ``step`` reuses
a transformers cache in place, which is what a token-by-token decoder wants.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicCache

from vdiff_worker.models.base import KVCache, ModelOutput


class CausalLM(nn.Module):
    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf
        # transformers 5 renamed ``past_key_values`` to ``cache`` (argument and output);
        # remote-code models may still use the old name.
        params = inspect.signature(hf.forward).parameters
        self._cache_name = "cache" if "cache" in params else "past_key_values"

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        key_mask: Tensor | None = None,
        kv_before: KVCache | None = None,
        kv_after: KVCache | None = None,
        return_kv: bool = False,
    ) -> ModelOutput:
        if kv_after is not None:
            raise ValueError("an autoregressive model attends only to earlier keys: no kv_after")
        n_before = int(kv_before[0][0].shape[2]) if kv_before else 0
        if position_ids is None:
            batch, length = input_ids.shape
            position_ids = torch.arange(
                n_before, n_before + length, device=input_ids.device
            ).expand(batch, length)
        # A cache without the model config keeps every layer whole (no sliding-window
        # cropping), so the new keys are always the tail after ``n_before``.
        cache = DynamicCache() if kv_before or return_kv else None
        if cache is not None and kv_before:
            for layer, (k, v) in enumerate(kv_before):
                cache.update(k, v, layer)
        logits, out_cache = self._run(input_ids, cache, key_mask, position_ids)
        if not return_kv or out_cache is None:
            return ModelOutput(logits=logits, kv=None)
        layers: list[Any] = list(out_cache.layers)
        kv = [(lay.keys[:, :, n_before:], lay.values[:, :, n_before:]) for lay in layers]
        return ModelOutput(logits=logits, kv=kv)

    def step(
        self,
        input_ids: Tensor,
        cache: Cache | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> tuple[Tensor, Cache]:
        """One decoding pass; ``cache`` (created when None) is extended in place.

        ``attention_mask`` is [B, cached + new] (1 = real token), as in transformers.
        """
        logits, out_cache = self._run(
            input_ids, cache if cache is not None else DynamicCache(), attention_mask, position_ids
        )
        assert out_cache is not None
        return logits, out_cache

    def _run(
        self,
        input_ids: Tensor,
        cache: Cache | None,
        mask: Tensor | None,
        position_ids: Tensor | None,
    ) -> tuple[Tensor, Cache | None]:
        out = self.hf(
            input_ids=input_ids,
            attention_mask=mask.long() if mask is not None else None,
            position_ids=position_ids,
            use_cache=cache is not None,
            **{self._cache_name: cache},
        )
        return out.logits, getattr(out, self._cache_name)

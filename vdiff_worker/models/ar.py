"""Autoregressive fallback: any transformers causal LM behind vdiff's forward contract.

``forward`` speaks the same contract as the diffusion models, causally: with a cache, row i
attends to its slot's first ``start[i]`` positions (its prefix) and to its new tokens up to
itself, and the new keys go into the slot. So an AR model decodes token by token with its
cache in the engine's slots, batched across sequences of any lengths, and serves as APD's
verifier.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicCache

from vdiff_worker.models.base import KVShape, ModelOutput
from vdiff_worker.models.kvcache import SlotBatch


class CausalLM(nn.Module):
    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf
        # transformers 5 renamed ``past_key_values`` to ``cache`` (argument and output);
        # remote-code models may still use the old name.
        params = inspect.signature(hf.forward).parameters
        self._cache_name = "cache" if "cache" in params else "past_key_values"

    def kv_shape(self) -> KVShape:
        cfg: Any = self.hf.config
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        heads = text.num_attention_heads
        return KVShape(
            text.num_hidden_layers,
            getattr(text, "num_key_value_heads", heads),
            getattr(text, "head_dim", None) or text.hidden_size // heads,
        )

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        key_mask: Tensor | None = None,
        cache: SlotBatch | None = None,
        heads: Tensor | None = None,
    ) -> ModelOutput:
        batch, length = input_ids.shape
        if cache is None:
            logits, _ = self._run(input_ids, None, key_mask, position_ids)
            return ModelOutput(logits=_picked(logits, heads))
        if key_mask is not None:
            raise ValueError("a cached pass takes its key mask from the cache")
        # The prefix each row attends to, gathered from its slot into a transformers cache.
        # A cache without the model config keeps every layer whole (no sliding-window
        # cropping), so the new keys are always the tail after the gathered prefix.
        past = max(cache.start)
        kv = DynamicCache()
        mask = None
        if past:
            for layer in range(self.kv_shape().layers):
                kv.update(*cache.read(layer, past), layer)
        col = torch.arange(past + length, device=input_ids.device)
        # Every row sees all of it when all prefixes and new spans are as long as the longest.
        if min(cache.start) < past or min(cache.lengths) < length:
            mask = torch.where(
                col[None, :] < past,
                col[None, :] < cache.start_ids[:, None],
                col[None, :] - past < cache.new_ids[:, None],
            )
        if position_ids is None:
            position_ids = cache.start_ids[:, None] + torch.arange(length, device=input_ids.device)
        logits, out = self._run(input_ids, kv, mask, position_ids)
        assert out is not None
        layers: list[Any] = list(out.layers)
        for layer, lay in enumerate(layers):
            cache.write(layer, lay.keys[:, :, past:], lay.values[:, :, past:])
        return ModelOutput(logits=_picked(logits, heads))

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


def _picked(logits: Tensor, heads: Tensor | None) -> Tensor:
    """The logits at ``heads`` ([B, W] positions of each row; all of them without)."""
    if heads is None:
        return logits
    return logits.gather(1, heads[:, :, None].expand(-1, -1, logits.shape[-1]))

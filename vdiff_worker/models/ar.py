"""Autoregressive fallback: any transformers causal LM behind vdiff's forward contract.

``forward`` speaks the same contract as the diffusion models, causally: with a cache, row i
attends to its slot's first ``start[i]`` positions (its prefix) and to its new tokens up to
itself, and the new keys go into the slot. So an AR model decodes token by token with its
cache in the engine's slots, batched across sequences of any lengths, and serves as APD's
verifier. The slots stand in for transformers' own cache (``SlotLayer``): each attention
layer writes its new keys into the slots in place and attends to a view of them, so no pass
copies a sequence's whole cache.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, CacheLayerMixin

from vdiff_worker.models.base import KVShape, ModelOutput
from vdiff_worker.models.kvcache import KVPair, SlotBatch


class SlotLayer(CacheLayerMixin):
    """One attention layer's transformers cache, kept in the engine's slots."""

    is_sliding = False

    def __init__(self, batch: SlotBatch, layer: int) -> None:
        super().__init__()
        self.batch, self.layer = batch, layer
        self.is_initialized = True

    # Signatures take what any transformers since 4.56 passes; the slots need none of it.
    def lazy_initialization(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to allocate: the slots are preallocated."""

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> KVPair:
        return self.batch.write_and_read(self.layer, key_states, value_states)

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        return self.batch.span, 0

    def get_seq_length(self) -> int:
        return max(self.batch.start)

    def get_max_length(self) -> int:
        return self.batch.store.length

    get_max_cache_shape = get_max_length  # its name before transformers 5


class CausalLM(nn.Module):
    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf
        # transformers 5 renamed ``past_key_values`` to ``cache`` (argument and output);
        # remote-code models may still use the old name.
        params = inspect.signature(hf.forward).parameters
        self._cache_name = "cache" if "cache" in params else "past_key_values"
        # Where the model can, it computes logits from the first position read on only: a
        # prompt's pass reads one, and prompt x vocabulary logits would not fit a real model.
        self._keeps_logits = "logits_to_keep" in params

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
        length = input_ids.shape[1]
        if cache is None:
            return ModelOutput(logits=self._run(input_ids, None, key_mask, position_ids, heads))
        if key_mask is not None:
            raise ValueError("a cached pass takes its key mask from the cache")
        if position_ids is None:
            position_ids = cache.start_ids[:, None] + torch.arange(length, device=input_ids.device)
        if not self._flash():
            mask: Tensor | None = _causal_mask(cache, length)
        elif length == 1 or _aligned(cache, length):
            # FlashAttention aligns the causal mask to the end of each row's keys, and with one
            # new token (or rows whose new tokens all end the slot's keys) that end is exact.
            mask = cache.key_mask
        else:
            return self._rows_alone(input_ids, position_ids, cache, heads)
        kv = Cache(layers=[SlotLayer(cache, i) for i in range(self.kv_shape().layers)])
        return ModelOutput(logits=self._run(input_ids, kv, mask, position_ids, heads))

    def _flash(self) -> bool:
        return str(getattr(self.hf.config, "_attn_implementation", "")).startswith("flash")

    def _rows_alone(
        self, input_ids: Tensor, position_ids: Tensor, cache: SlotBatch, heads: Tensor | None
    ) -> ModelOutput:
        """One call per row: transformers' FlashAttention path reads where a row's new tokens
        sit from the end of a 2D mask, so rows of several new tokens ending at different
        positions cannot share a call there."""
        rows = []
        for row, (slot, start, n) in enumerate(zip(cache.slots, cache.start, cache.lengths)):
            one = SlotBatch(cache.store, [slot], [start], [n], [start + n])
            # Positions past the row's own tokens are padding, their logits never read.
            picks = None if heads is None else heads[row : row + 1].clamp(max=n - 1)
            out = self.forward(
                input_ids[row : row + 1, :n],
                position_ids[row : row + 1, :n],
                cache=one,
                heads=picks,
            )
            rows.append(out.logits)
        if heads is None:
            width = input_ids.shape[1]
            rows = [torch.nn.functional.pad(r, (0, 0, 0, width - r.shape[1])) for r in rows]
        return ModelOutput(logits=torch.cat(rows))

    def _run(
        self,
        input_ids: Tensor,
        cache: Cache | None,
        mask: Tensor | None,
        position_ids: Tensor | None,
        heads: Tensor | None,
    ) -> Tensor:
        """The logits at ``heads`` ([B, W] positions of each row; all of them without)."""
        first, extra = 0, {}
        if heads is not None and heads.numel() and self._keeps_logits:
            first = int(heads.min())  # the runner's heads are a host tensor: no device wait
            extra["logits_to_keep"] = input_ids.shape[1] - first
        out = self.hf(
            input_ids=input_ids,
            attention_mask=mask.long() if mask is not None and mask.ndim == 2 else mask,
            position_ids=position_ids,
            use_cache=cache is not None,
            **{self._cache_name: cache},
            **extra,
        )
        logits: Tensor = out.logits
        if heads is None:
            return logits
        at = (heads - first).to(logits.device)
        return logits.gather(1, at[:, :, None].expand(-1, -1, logits.shape[-1]))


def _causal_mask(cache: SlotBatch, length: int) -> Tensor:
    """[B, 1, L, K] additive: row i's new token j sits at slot position start[i] + j and sees
    every position up to its own (eager attention adds the mask; SDPA takes either form)."""
    device = cache.start_ids.device
    col = torch.arange(cache.span, device=device)
    at = cache.start_ids[:, None] + torch.arange(length, device=device)
    seen = col[None, None, :] <= at[:, :, None]
    dtype = cache.store.dtype
    mask = torch.zeros(seen.shape, dtype=dtype, device=device)
    return mask.masked_fill(~seen, torch.finfo(dtype).min)[:, None]


def _aligned(cache: SlotBatch, length: int) -> bool:
    """Every row writes ``length`` new tokens that end at the call's last key."""
    return all(n == length and s + n == cache.span for s, n in zip(cache.start, cache.lengths))

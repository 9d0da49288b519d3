"""LLaDA (GSAI-ML/LLaDA-8B-*) as a native bidirectional transformer.

Module names follow the checkpoint (``model.transformer.blocks.N.attn_out`` ...) so the
weights load by name; the query, key and value projections and the MLP's ``ff_proj`` and
``up_proj`` are packed (vdiff_worker.models.packing). Only the Llama-style block LLaDA
ships is implemented; configs asking for other OLMo variants are refused at load time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from torch import Tensor, nn

from vdiff_worker.models.base import AttentionBlock, BidirectionalLM, KVShape
from vdiff_worker.models.config import get_bool, get_float, get_int, require_value
from vdiff_worker.models.kvcache import SlotBatch
from vdiff_worker.models.layers import (
    RMSNorm,
    RopeTables,
    Rotary,
    live_params,
    llama_block,
    project,
)
from vdiff_worker.models.packing import Packed


@dataclass(frozen=True)
class LLaDAConfig:
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden_size: int
    embedding_size: int
    rope_theta: float
    rms_norm_eps: float
    include_bias: bool
    include_qkv_bias: bool
    weight_tying: bool
    input_emb_norm: bool
    scale_logits: bool
    rope_full_precision: bool
    max_sequence_length: int
    mask_token_id: int | None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> LLaDAConfig:
        for key, allowed in (
            ("block_type", ("llama",)),
            ("layer_norm_type", ("rms",)),
            ("activation_type", ("silu", "swiglu")),
            ("rope", (True,)),
            ("alibi", (False,)),
            ("attention_layer_norm", (False,)),
            ("layer_norm_with_affine", (True,)),
            ("bias_for_layer_norm", (None, False)),
        ):
            require_value(cfg, key, allowed, "LLaDA")
        d_model = get_int(cfg, "d_model")
        n_heads = get_int(cfg, "n_heads")
        kv_default = 1 if cfg.get("multi_query_attention") else n_heads
        mask = cfg.get("mask_token_id")
        return cls(
            d_model=d_model,
            n_layers=get_int(cfg, "n_layers"),
            n_heads=n_heads,
            n_kv_heads=get_int(cfg, "n_kv_heads", default=kv_default),
            mlp_hidden_size=get_int(
                cfg, "mlp_hidden_size", default=get_int(cfg, "mlp_ratio", default=4) * d_model
            ),
            embedding_size=get_int(cfg, "embedding_size", "vocab_size"),
            rope_theta=get_float(cfg, "rope_theta", 10000.0),
            rms_norm_eps=get_float(cfg, "rms_norm_eps", 1e-5),
            include_bias=get_bool(cfg, "include_bias", False),
            include_qkv_bias=get_bool(cfg, "include_qkv_bias", False),
            weight_tying=get_bool(cfg, "weight_tying", False),
            input_emb_norm=get_bool(cfg, "input_emb_norm", False),
            scale_logits=get_bool(cfg, "scale_logits", False),
            rope_full_precision=get_bool(cfg, "rope_full_precision", True),
            max_sequence_length=get_int(cfg, "max_sequence_length", default=4096),
            mask_token_id=mask if isinstance(mask, int) else None,
        )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class LLaDABlock(AttentionBlock):
    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        qkv_bias = cfg.include_bias or cfg.include_qkv_bias
        bias = cfg.include_bias
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.qkv = Packed(
            cfg.d_model, (("q_proj", cfg.d_model), ("k_proj", kv_dim), ("v_proj", kv_dim)), qkv_bias
        )
        self.attn_out = nn.Linear(cfg.d_model, cfg.d_model, bias=bias)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        hidden = cfg.mlp_hidden_size
        self.gate_up = Packed(cfg.d_model, (("ff_proj", hidden), ("up_proj", hidden)), bias)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, cfg.d_model, bias=bias)
        self.eps = cfg.rms_norm_eps
        self.params = live_params(
            self.attn_norm, self.qkv, self.attn_out, self.ff_norm, self.gate_up, self.ff_out
        )

    def forward(
        self,
        h: Tensor,
        rope: RopeTables,
        key_mask: Tensor | None,
        cache: SlotBatch | None,
        layer: int,
        rows: Tensor | None = None,
    ) -> Tensor:
        return llama_block(
            h,
            self.params,
            self.eps,
            self.n_heads,
            self.n_kv_heads,
            rope,
            key_mask,
            cache,
            layer,
            rows,
        )


class LLaDATransformer(nn.Module):
    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.embedding_size, cfg.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        # With weight tying the output projection is the embedding itself.
        self.ff_out = (
            None
            if cfg.weight_tying
            else nn.Linear(cfg.d_model, cfg.embedding_size, bias=cfg.include_bias)
        )


class LLaDAWrapper(nn.Module):
    """The ``model.`` level of the checkpoint's names."""

    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__()
        self.transformer = LLaDATransformer(cfg)


class LLaDAModel(BidirectionalLM):
    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__()
        self.config = cfg
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_full_precision)
        self.model = LLaDAWrapper(cfg)

    def kv_shape(self) -> KVShape:
        c = self.config
        return KVShape(c.n_layers, c.n_kv_heads, c.head_dim)

    def embed(self, input_ids: Tensor) -> Tensor:
        h: Tensor = self.model.transformer.wte(input_ids)
        if self.config.input_emb_norm:
            h = h * self.config.d_model**0.5
        return h

    def layers(self) -> Sequence[AttentionBlock]:
        return cast(Sequence[AttentionBlock], self.model.transformer.blocks)

    def head(self, h: Tensor) -> Tensor:
        t = self.model.transformer
        h = t.ln_f(h)
        logits = project(h, t.ff_out, t.wte)
        if self.config.scale_logits:
            logits = logits * (1 / math.sqrt(self.config.d_model))
        return logits

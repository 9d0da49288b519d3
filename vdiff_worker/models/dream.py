"""Dream (Dream-org/Dream-v0-*) as a native bidirectional transformer.

Dream is Qwen2 (q/k/v bias, grouped-query attention, RMSNorm, SwiGLU) with the causal
mask removed. Logits come back raw: Dream reads the prediction for position i at i - 1,
and that shift belongs to the decoder. Module names follow the checkpoint
(``model.layers.N.self_attn.o_proj`` ..., ``lm_head``); q/k/v and gate/up are packed
(vdiff_worker.models.packing).
"""

from __future__ import annotations

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
class DreamConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    mask_token_id: int | None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> DreamConfig:
        require_value(cfg, "hidden_act", ("silu",), "Dream")
        require_value(cfg, "rope_scaling", (None,), "Dream")
        require_value(cfg, "use_sliding_window", (False,), "Dream")
        hidden = get_int(cfg, "hidden_size")
        heads = get_int(cfg, "num_attention_heads")
        mask = cfg.get("mask_token_id")
        return cls(
            hidden_size=hidden,
            num_layers=get_int(cfg, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=get_int(cfg, "num_key_value_heads", default=heads),
            head_dim=get_int(cfg, "head_dim", default=hidden // heads),
            intermediate_size=get_int(cfg, "intermediate_size"),
            vocab_size=get_int(cfg, "vocab_size"),
            rope_theta=get_float(cfg, "rope_theta", 10000.0),
            rms_norm_eps=get_float(cfg, "rms_norm_eps", 1e-6),
            tie_word_embeddings=get_bool(cfg, "tie_word_embeddings", False),
            max_position_embeddings=get_int(cfg, "max_position_embeddings", default=32768),
            mask_token_id=mask if isinstance(mask, int) else None,
        )


class DreamAttention(nn.Module):
    """The ``self_attn.`` level of the checkpoint's names (DreamLayer runs it)."""

    def __init__(self, cfg: DreamConfig) -> None:
        super().__init__()
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv = Packed(
            cfg.hidden_size, (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)), True
        )
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=False)


class DreamMLP(nn.Module):
    """The ``mlp.`` level of the checkpoint's names (DreamLayer runs it)."""

    def __init__(self, cfg: DreamConfig) -> None:
        super().__init__()
        width = cfg.intermediate_size
        self.gate_up = Packed(cfg.hidden_size, (("gate_proj", width), ("up_proj", width)), False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)


class DreamLayer(AttentionBlock):
    def __init__(self, cfg: DreamConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DreamAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = DreamMLP(cfg)
        self.eps = cfg.rms_norm_eps
        self.params = live_params(
            self.input_layernorm,
            self.self_attn.qkv,
            self.self_attn.o_proj,
            self.post_attention_layernorm,
            self.mlp.gate_up,
            self.mlp.down_proj,
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
            self.num_heads,
            self.num_kv_heads,
            rope,
            key_mask,
            cache,
            layer,
            rows,
        )


class DreamBackbone(nn.Module):
    """The ``model.`` level of the checkpoint's names."""

    def __init__(self, cfg: DreamConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DreamLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DreamModel(BidirectionalLM):
    def __init__(self, cfg: DreamConfig) -> None:
        super().__init__()
        self.config = cfg
        # Qwen2 rotates in the model dtype, not float32.
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, full_precision=False)
        self.model = DreamBackbone(cfg)
        # Tied checkpoints carry no lm_head: the embedding doubles as the output projection.
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )

    def kv_shape(self) -> KVShape:
        c = self.config
        return KVShape(c.num_layers, c.num_kv_heads, c.head_dim)

    def embed(self, input_ids: Tensor) -> Tensor:
        h: Tensor = self.model.embed_tokens(input_ids)
        return h

    def layers(self) -> Sequence[AttentionBlock]:
        return cast(Sequence[AttentionBlock], self.model.layers)

    def head(self, h: Tensor) -> Tensor:
        return project(self.model.norm(h), self.lm_head, self.model.embed_tokens)

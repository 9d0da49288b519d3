"""LLaDA2.0 / LLaDA2.1 (inclusionAI/LLaDA2.*, ``llada2_moe``) as a native transformer.

A Ling-style mixture-of-experts: fused ``query_key_value`` projection with grouped-query
heads, RMSNorm over each query and key head before a partial rotary embedding (NeoX
rotate-half on the first ``rotary_dim`` dims), then a dense SwiGLU MLP for the first
``first_k_dense_replace`` layers and, after them, a sigmoid-routed MoE: group-limited top-k
selection biased by ``expert_bias``, plus always-on shared experts. The model is trained
block-causally; the block structure arrives as ``limits`` in the shared forward, so this
module itself attends bidirectionally over whatever keys it is given. Module names follow the
checkpoint (``model.word_embeddings``, ``model.layers.N.attention.query_key_value`` ...,
``lm_head``) so the weights load by name; each MLP's gate and up projections are packed
(vdiff_worker.models.packing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vdiff_worker.models.base import AttentionBlock, BidirectionalLM, KVShape
from vdiff_worker.models.config import get_bool, get_float, get_int, require_value
from vdiff_worker.models.errors import CheckpointError
from vdiff_worker.models.kvcache import SlotBatch
from vdiff_worker.models.layers import (
    RMSNorm,
    RopeTables,
    Rotary,
    apply_rope,
    attend,
    merge_heads,
    pick,
    project,
    swiglu,
)
from vdiff_worker.models.packing import Packed


@dataclass(frozen=True)
class LLaDA2Config:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    use_qkv_bias: bool
    use_bias: bool
    use_qk_norm: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    mask_token_id: int | None
    # Mixture of experts; num_experts 0 means every layer is dense.
    num_experts: int
    first_k_dense_replace: int
    moe_intermediate_size: int
    num_experts_per_tok: int
    num_shared_experts: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    expert_bias: bool

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> LLaDA2Config:
        for key, allowed in (
            ("hidden_act", ("silu",)),
            ("rope_scaling", (None,)),
            ("use_rmsnorm", (True,)),
            ("score_function", ("sigmoid",)),
            ("router_dtype", ("fp32", "float32")),
            ("norm_topk_prob", (True,)),
            ("use_sliding_window", (False,)),
        ):
            require_value(cfg, key, allowed, "LLaDA2")
        hidden = get_int(cfg, "hidden_size")
        heads = get_int(cfg, "num_attention_heads")
        head_dim = get_int(cfg, "head_dim", default=hidden // heads)
        # The rope init of the reference reads partial_rotary_factor; rotary_dim is
        # informational there, so a config where the two disagree is ambiguous.
        rotary_dim = int(head_dim * get_float(cfg, "partial_rotary_factor", 1.0))
        stated = cfg.get("rotary_dim")
        if stated is not None and stated != rotary_dim:
            raise CheckpointError(
                f"config.json: rotary_dim={stated!r} disagrees with head_dim * "
                f"partial_rotary_factor = {rotary_dim}"
            )
        if rotary_dim <= 0 or rotary_dim > head_dim or rotary_dim % 2:
            raise CheckpointError(
                f"config.json: rotary dims {rotary_dim} must be even and within head_dim"
            )
        experts = get_int(cfg, "num_experts", default=0)
        mask = cfg.get("mask_token_id")
        config = cls(
            hidden_size=hidden,
            num_layers=get_int(cfg, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=get_int(cfg, "num_key_value_heads", default=heads),
            head_dim=head_dim,
            rotary_dim=rotary_dim,
            intermediate_size=get_int(cfg, "intermediate_size"),
            vocab_size=get_int(cfg, "vocab_size"),
            rope_theta=get_float(cfg, "rope_theta", 10000.0),
            rms_norm_eps=get_float(cfg, "rms_norm_eps", 1e-6),
            use_qkv_bias=get_bool(cfg, "use_qkv_bias", False),
            use_bias=get_bool(cfg, "use_bias", False),
            use_qk_norm=get_bool(cfg, "use_qk_norm", False),
            tie_word_embeddings=get_bool(cfg, "tie_word_embeddings", False),
            max_position_embeddings=get_int(cfg, "max_position_embeddings", default=32768),
            mask_token_id=mask if isinstance(mask, int) else None,
            num_experts=experts,
            first_k_dense_replace=get_int(cfg, "first_k_dense_replace", default=0),
            moe_intermediate_size=get_int(cfg, "moe_intermediate_size") if experts else 0,
            num_experts_per_tok=get_int(cfg, "num_experts_per_tok", default=1),
            num_shared_experts=get_int(cfg, "num_shared_experts", default=0),
            n_group=get_int(cfg, "n_group", default=1),
            topk_group=get_int(cfg, "topk_group", default=1),
            routed_scaling_factor=get_float(cfg, "routed_scaling_factor", 1.0),
            expert_bias=get_bool(cfg, "moe_router_enable_expert_bias", False),
        )
        config.check_routing()
        return config

    def check_routing(self) -> None:
        """Refuse router shapes the group-limited top-k cannot take."""
        if not self.num_experts:
            return
        n, groups, k = self.num_experts, self.n_group, self.num_experts_per_tok
        per_group = n // groups if groups > 0 else 0
        # Each group is scored by its two best experts, so it needs two.
        if groups < 1 or n % groups or per_group < 2:
            raise CheckpointError(
                f"config.json: num_experts={n} must split into n_group={groups} groups of "
                "two or more experts"
            )
        if not 1 <= self.topk_group <= groups or not 1 <= k <= self.topk_group * per_group:
            raise CheckpointError(
                f"config.json: topk_group={self.topk_group} / num_experts_per_tok={k} do not "
                f"fit {groups} groups of {per_group} experts"
            )

    def is_moe(self, layer: int) -> bool:
        return self.num_experts > 0 and layer >= self.first_k_dense_replace


def apply_partial_rope(x: Tensor, rope: RopeTables, dim: int) -> Tensor:
    """Rotate the first ``dim`` dims of each head of ``x`` [B, L, H, D]; keep the rest."""
    if dim == x.shape[-1]:
        return apply_rope(x, rope)
    return torch.cat((apply_rope(x[..., :dim], rope), x[..., dim:]), dim=-1)


class LLaDA2Attention(nn.Module):
    def __init__(self, cfg: LLaDA2Config) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.rotary_dim = cfg.rotary_dim
        fused = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, fused, bias=cfg.use_qkv_bias)
        self.query_layernorm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.use_qk_norm else None
        self.key_layernorm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.use_qk_norm else None
        self.dense = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.use_bias)

    def forward(
        self,
        x: Tensor,
        rope: RopeTables,
        key_mask: Tensor | None,
        cache: SlotBatch | None,
        layer: int,
        rows: Tensor | None = None,
    ) -> Tensor:
        batch, length, _ = x.shape
        # The fused output is [q heads | k heads | v heads], each head_dim wide.
        qkv = self.query_key_value(x).view(
            batch, length, self.num_heads + 2 * self.num_kv_heads, self.head_dim
        )
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        if self.query_layernorm is not None and self.key_layernorm is not None:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q = apply_partial_rope(q, rope, self.rotary_dim).transpose(1, 2)
        k = apply_partial_rope(k, rope, self.rotary_dim).transpose(1, 2)
        v = v.transpose(1, 2)
        att = merge_heads(attend(q, (k, v), key_mask, cache, layer, rows))
        out: Tensor = self.dense(att)
        return out


class LLaDA2MLP(nn.Module):
    """SwiGLU MLP: the dense layers, each routed expert and the shared experts."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        parts = (("gate_proj", intermediate), ("up_proj", intermediate))
        self.gate_up = Packed(hidden, parts, False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.down_proj(swiglu(self.gate_up(x)))
        return out


class LLaDA2Router(nn.Module):
    """Sigmoid router with group-limited top-k, in float32 whatever the model dtype.

    Not an ``nn.Linear``, so weight-only quantization leaves it alone: expert choice is
    decided by small score differences.
    """

    def __init__(self, cfg: LLaDA2Config) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.scale = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        # A buffer in the reference, but stored in the checkpoint: a frozen parameter lets
        # the loader fill it by name like every other tensor.
        self.expert_bias = (
            nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False)
            if cfg.expert_bias
            else None
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Experts [T, k] and their float32 weights [T, k] for the tokens ``x`` [T, H]."""
        logits = F.linear(x.float(), self.weight.float())
        scores = torch.sigmoid(logits)
        # The bias steers selection only; the weights come from the unbiased scores.
        routing = scores if self.expert_bias is None else scores + self.expert_bias
        tokens = routing.shape[0]
        groups = routing.view(tokens, self.n_group, -1)
        group_scores = groups.topk(2, dim=-1).values.sum(dim=-1)
        best = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        keep = keep[:, :, None].expand_as(groups).reshape(tokens, -1)
        experts = routing.masked_fill(~keep, float("-inf")).topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return experts, weights * self.scale


class LLaDA2MoE(nn.Module):
    def __init__(self, cfg: LLaDA2Config) -> None:
        super().__init__()
        self.gate = LLaDA2Router(cfg)
        self.experts = nn.ModuleList(
            LLaDA2MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts)
        )
        shared = cfg.moe_intermediate_size * cfg.num_shared_experts
        self.shared_experts = LLaDA2MLP(cfg.hidden_size, shared) if shared else None

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        experts, weights = self.gate(flat)
        top_k = experts.shape[1]
        # Token slots (token, choice) grouped by expert: one matmul chain per used expert.
        slots = experts.flatten()
        order = slots.argsort()
        grouped = flat[order // top_k]
        # How many slots each expert got, read on the host once per MoE layer (as the
        # reference does) to cut the grouped tokens into per-expert chunks.
        counts = torch.bincount(slots, minlength=len(self.experts)).tolist()
        outs = [
            self.experts[e](chunk) for e, chunk in enumerate(grouped.split(counts)) if counts[e]
        ]
        routed = torch.empty_like(grouped)
        routed[order] = torch.cat(outs) if outs else grouped[:0]
        # Combine in float32 (the router's dtype), then back to the model dtype.
        combined = (routed.view(-1, top_k, shape[-1]).float() * weights[..., None]).sum(dim=1)
        out = combined.to(x.dtype).view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class LLaDA2Layer(AttentionBlock):
    def __init__(self, cfg: LLaDA2Config, index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = LLaDA2Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = (
            LLaDA2MoE(cfg)
            if cfg.is_moe(index)
            else LLaDA2MLP(cfg.hidden_size, cfg.intermediate_size)
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
        x = self.input_layernorm(h)
        h = pick(h, rows) + self.attention(x, rope, key_mask, cache, layer, rows)
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h


class LLaDA2Backbone(nn.Module):
    """The ``model.`` level of the checkpoint's names."""

    def __init__(self, cfg: LLaDA2Config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LLaDA2Layer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LLaDA2Model(BidirectionalLM):
    def __init__(self, cfg: LLaDA2Config) -> None:
        super().__init__()
        self.config = cfg
        # Tables in float32, cast to the model dtype, rotation in it (the reference's rope).
        self.rotary = Rotary(cfg.rotary_dim, cfg.rope_theta, full_precision=False)
        self.model = LLaDA2Backbone(cfg)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )

    def kv_shape(self) -> KVShape:
        c = self.config
        return KVShape(c.num_layers, c.num_kv_heads, c.head_dim)

    def embed(self, input_ids: Tensor) -> Tensor:
        h: Tensor = self.model.word_embeddings(input_ids)
        return h

    def layers(self) -> Sequence[AttentionBlock]:
        return cast(Sequence[AttentionBlock], self.model.layers)

    def head(self, h: Tensor) -> Tensor:
        return project(self.model.norm(h), self.lm_head, self.model.word_embeddings)

"""Building blocks shared by the native diffusion models: RMSNorm, RoPE, attention."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vdiff_worker.models import extension
from vdiff_worker.models.kvcache import KVPair, SlotBatch

AttentionBackend = Literal["sdpa", "flash", "eager"]
ATTENTION_BACKENDS: tuple[AttentionBackend, ...] = ("sdpa", "flash", "eager")
_backend: AttentionBackend = "sdpa"


def set_attention_backend(name: AttentionBackend) -> None:
    """Choose how every native model in this process attends (the worker's --attention).

    ``sdpa``: PyTorch's scaled_dot_product_attention (it picks its own kernel);
    ``flash``: the flash-attn package's kernels (CUDA, half precision; checked at start by
    vdiff_worker.accel); ``eager``: softmax(QK^T / sqrt(d)) V written out.
    """
    global _backend
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; use {', '.join(ATTENTION_BACKENDS)}")
    _backend = name


def attention_backend() -> AttentionBackend:
    return _backend


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self._parameters, self.eps)


Params = dict[str, nn.Parameter | None]


def live_params(*layers: nn.Module) -> tuple[Params, ...]:
    """The layers' own parameter dicts, for a block to read its weights from.

    A small model's pass costs more in Python than in arithmetic, and nn.Module's attribute
    lookup is a Python call per submodule and per weight: reading the dicts instead makes a
    32-token pass of llada-tiny about 6% faster. They are live: a weight replaced later
    (quantization swaps in a new one) shows in them; the layers themselves are never
    replaced.
    """
    return tuple(layer._parameters for layer in layers)


def rms_norm(x: Tensor, params: Params, eps: float) -> Tensor:
    """RMSNorm by its parameters. Normalises in float32 whatever the model dtype, then casts
    back and scales, as both reference models do; PyTorch's own x * rsqrt(mean(x^2) + eps)
    is one call."""
    weight = params["weight"]
    assert weight is not None
    if x.dtype == torch.float32:  # the casts would be no-ops, each a call all the same
        return weight * F.rms_norm(x, weight.shape, None, eps)
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)


def linear(x: Tensor, params: Params) -> Tensor:
    """A linear layer by its parameters (a quantized weight dispatches through ``F.linear``
    as in ``nn.Linear.forward``; no hooks are used)."""
    weight = params["weight"]
    assert weight is not None
    return F.linear(x, weight, params["bias"])


@dataclass
class RopeTables:
    """Per position, in the dtype the rotation is computed in, laid out [B, L, 1, D] to
    broadcast over the heads of a [B, L, H, D] projection."""

    cos: Tensor
    sin: Tensor  # its first half negated: the rotation is then one roll, no negation


class Rotary:
    """Rotary position embedding (rotate-half layout) for explicit position ids.

    ``full_precision`` rotates in float32 (LLaDA); otherwise the tables are cast to the
    model dtype first and the rotation runs in it (Qwen2 / Dream).
    """

    def __init__(self, head_dim: int, theta: float, full_precision: bool) -> None:
        self.head_dim = head_dim
        self.theta = theta
        self.full_precision = full_precision
        self._inv_freq: dict[torch.device, Tensor] = {}
        # The last host positions and their tables: a sequence's passes repeat their
        # positions (every step of a block), and on a CPU, where a small model's pass is
        # bound by its op count, a comparison costs less than the ten ops of the tables.
        self._last: tuple[Tensor, torch.dtype, RopeTables] | None = None

    def inv_freq(self, device: torch.device) -> Tensor:
        if device not in self._inv_freq:
            exponent = torch.arange(0, self.head_dim, 2, device=device).float()
            self._inv_freq[device] = 1.0 / (self.theta ** (exponent / self.head_dim))
        return self._inv_freq[device]

    def tables(self, position_ids: Tensor, dtype: torch.dtype) -> RopeTables:
        last = self._last
        if (
            last is not None
            and last[1] == dtype
            and last[0].device == position_ids.device
            and last[0].shape == position_ids.shape
            and torch.equal(last[0], position_ids)
        ):
            return last[2]
        rope = self._tables(position_ids, dtype)
        if position_ids.device.type == "cpu":  # elsewhere the comparison would wait for it
            self._last = (position_ids.clone(), dtype, rope)
        return rope

    def _tables(self, position_ids: Tensor, dtype: torch.dtype) -> RopeTables:
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids.device)
        cos, sin = freqs.cos(), freqs.sin()
        cos, sin = (
            torch.cat((cos, cos), dim=-1)[:, :, None],
            torch.cat((-sin, sin), dim=-1)[:, :, None],
        )
        if not self.full_precision:
            cos, sin = cos.to(dtype), sin.to(dtype)
        return RopeTables(cos=cos, sin=sin)


def apply_rope(x: Tensor, rope: RopeTables) -> Tensor:
    """Rotate ``x`` [B, L, H, D] by the position tables: x cos + (-x2, x1) sin, with the
    sign carried by the table (negating either factor gives the same bits)."""
    half = x.shape[-1] // 2
    if x.dtype == rope.cos.dtype:
        return x * rope.cos + x.roll(half, dims=-1) * rope.sin
    xt = x.to(rope.cos.dtype)
    return (xt * rope.cos + xt.roll(half, dims=-1) * rope.sin).to(x.dtype)


def qkv_heads(
    qkv: Tensor, heads: int, kv_heads: int, rope: RopeTables
) -> tuple[Tensor, Tensor, Tensor]:
    """A packed [B, L, (H + 2 H_kv) * D] projection as rotated queries [B, H, L, D],
    rotated keys and values [B, H_kv, L, D]: queries and keys rotate in one call."""
    batch, length, _ = qkv.shape
    x = qkv.view(batch, length, heads + 2 * kv_heads, -1)
    qk = apply_rope(x[:, :, : heads + kv_heads], rope)
    v = x[:, :, heads + kv_heads :]
    return qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2), v.transpose(1, 2)


def llama_block(
    h: Tensor,
    params: tuple[Params, ...],
    eps: float,
    heads: int,
    kv_heads: int,
    rope: RopeTables,
    key_mask: Tensor | None,
    cache: SlotBatch | None,
    layer: int,
    rows: Tensor | None,
) -> Tensor:
    """The Llama-style block LLaDA and Dream share, by its parameters (attention norm,
    packed q/k/v, output projection, MLP norm, packed gate/up, down projection): pre-norm
    attention, then a pre-norm SwiGLU MLP, each added to the residual. While the compiled
    block is enabled (vdiff_worker.models.extension) the arithmetic around attention runs
    there, the same ops in C++."""
    attn_norm, qkv, out, mlp_norm, gate_up, down = params
    native = extension.ops()
    if native is None:
        q, k, v = qkv_heads(linear(rms_norm(h, attn_norm, eps), qkv), heads, kv_heads, rope)
    else:
        q, k, v = native.attention_input(
            h, attn_norm["weight"], qkv["weight"], qkv["bias"], eps, heads, kv_heads,
            rope.cos, rope.sin,
        )  # fmt: skip
    att = attend(q, (k, v), key_mask, cache, layer, rows)
    h = pick(h, rows)
    if native is not None:
        return native.block_output(  # type: ignore[no-any-return]
            h, att, out["weight"], out["bias"], mlp_norm["weight"], gate_up["weight"],
            gate_up["bias"], down["weight"], down["bias"], eps,
        )  # fmt: skip
    h = h + linear(merge_heads(att), out)
    return h + linear(swiglu(linear(rms_norm(h, mlp_norm, eps), gate_up)), down)


def merge_heads(x: Tensor) -> Tensor:
    """[B, H, L, D] -> [B, L, H*D]."""
    batch, _, length, _ = x.shape
    return x.transpose(1, 2).reshape(batch, length, -1)


def attend(
    q: Tensor,
    kv: KVPair,
    key_mask: Tensor | None,
    cache: SlotBatch | None,
    layer: int,
    rows: Tensor | None = None,
) -> Tensor:
    """Bidirectional attention of the new queries over their keys, or over their slots.

    ``q`` is [B, H, L, D]; keys/values are [B, H_kv, *, D] with H a multiple of H_kv;
    ``key_mask`` is a boolean [B, 1, 1, K] or, a mask per query, [B, 1, L, K] (True =
    attend), or None. With ``cache`` the new keys are written into each row's slot first and
    the row attends to its slot. With ``rows`` ([B, W] positions) only those queries attend
    ([B, H, W, D] out): every key is still written and read. FlashAttention has no
    per-query mask (block-causal attention): those calls run through SDPA.
    """
    k, v = cache.write_and_read(layer, *kv) if cache is not None else kv
    if rows is not None:
        batch, heads, _, dim = q.shape
        q = q.gather(2, rows[:, None, :, None].expand(batch, heads, -1, dim))
        if key_mask is not None and key_mask.shape[2] > 1:
            key_mask = key_mask.gather(
                2, rows[:, None, :, None].expand(-1, -1, -1, key_mask.shape[3])
            )
    per_query = key_mask is not None and key_mask.shape[2] > 1
    if _backend == "flash" and not per_query:
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        return flash_attention(q, k, v, key_mask, flash_attn_func, flash_attn_varlen_func)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if _backend == "eager":
        return eager_attention(q, k, v, key_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)


def eager_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    """softmax(QK^T / sqrt(d)) V with the softmax in float32; k, v have q's head count."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Tensor | None,
    dense: Callable[..., Tensor],
    varlen: Callable[..., Tensor],
) -> Tensor:
    """Attention through FlashAttention's ``flash_attn_func`` / ``flash_attn_varlen_func``.

    Takes vdiff's [B, H, L, D] layout (k, v may have fewer heads: FlashAttention groups
    queries itself). Without a mask one dense call; with one, every query row is kept and
    each row's masked keys are dropped from a packed (varlen) key list, which is exact for
    bidirectional attention whatever the mask's pattern.
    """
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, L, H, D]
    if key_mask is None:
        return dense(qt, kt, vt, causal=False).transpose(1, 2)
    batch, length, heads, dim = qt.shape
    keep = key_mask.reshape(batch, -1)  # [B, K]
    lengths = keep.sum(dim=-1, dtype=torch.int32)
    cu_k = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=q.device)
    out = varlen(
        qt.reshape(batch * length, heads, dim),
        kt[keep],
        vt[keep],
        cu_q,
        cu_k,
        length,
        kt.shape[1],
        causal=False,
    )
    return out.view(batch, length, heads, dim).transpose(1, 2)


def pick(x: Tensor, rows: Tensor | None) -> Tensor:
    """``x`` [B, L, D], or with ``rows`` ([B, W] positions of each row) those [B, W, D]."""
    return x if rows is None else x.gather(1, rows[:, :, None].expand(-1, -1, x.shape[-1]))


def project(h: Tensor, head: nn.Linear | None, embedding: nn.Embedding) -> Tensor:
    """Logits through the output head, or through the embedding where the checkpoint ties
    the two (it then ships no head)."""
    return F.linear(h, embedding.weight) if head is None else linear(h, head._parameters)


def swiglu(gate_up: Tensor) -> Tensor:
    """SiLU(gate) * up of a packed [..., 2 * I] gate-and-up projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up

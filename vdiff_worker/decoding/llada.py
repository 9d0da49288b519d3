"""LLaDA's reference sampler: semi-autoregressive blocks, low-confidence or random remasking."""

from __future__ import annotations

import torch
from torch import Tensor

from vdiff_worker.decoding.base import (
    Forward,
    ParamError,
    Settings,
    Steps,
    Strategy,
    blocks,
    steps_per_block,
    transfer_schedule,
)


def gumbel_argmax(logits: Tensor, temperature: float, gen: torch.Generator) -> Tensor:
    """LLaDA's noisy argmax: exp(l) / (-log u)^T in float64; plain argmax at T = 0."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    l64 = logits.to(torch.float64)
    u = torch.rand(l64.shape, generator=gen, dtype=torch.float64, device=l64.device)
    return (l64.exp() / (-torch.log(u)) ** temperature).argmax(dim=-1)


def guided(fwd_logits: Tensor, cfg_scale: float) -> Tensor:
    """Unsupervised classifier-free guidance over the (conditional, unconditional) rows."""
    if cfg_scale <= 0.0:
        return fwd_logits[0]
    cond, uncond = fwd_logits[0], fwd_logits[1]
    return uncond + (cfg_scale + 1.0) * (cond - uncond)


def model_call(prompt: Tensor, canvas: Tensor, mask_id: int, cfg_scale: float) -> Forward:
    """A pass over prompt + canvas; with CFG a second row has the prompt masked."""
    x = torch.cat([prompt, canvas]).unsqueeze(0)
    if cfg_scale > 0.0:
        uncond = x.clone()
        uncond[0, : prompt.numel()] = mask_id
        x = torch.cat([x, uncond])
    pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0).expand_as(x)
    return Forward(input_ids=x, position_ids=pos)


class LLaDAReference(Strategy):
    name = "reference"
    kinds = ("llada",)

    @classmethod
    def check(cls, s: Settings) -> None:
        if s.remasking not in ("low_confidence", "random"):
            raise ParamError("remasking", "remasking must be 'low_confidence' or 'random'")
        if s.top_p != 1.0 or s.top_k not in (-1, 0):
            raise ParamError("top_p" if s.top_p != 1.0 else "top_k",
                             "LLaDA's reference sampler has no top_p/top_k; use decoding "
                             "'reference' on a Dream model or leave them unset")

    def run(self) -> Steps:
        ctx, s = self.ctx, self.ctx.settings
        P = ctx.prompt.numel()
        spans = blocks(s.gen_length, s.block_length)
        per_block = steps_per_block(s.steps, len(spans))
        for start, end in spans:
            n_masked = int((ctx.canvas[start:end] == ctx.mask_id).sum())
            for k in transfer_schedule(n_masked, per_block):
                if k == 0:
                    continue  # the reference spends a pass that changes nothing here
                out = yield model_call(ctx.prompt, ctx.canvas, ctx.mask_id, s.cfg_scale)
                logits = guided(out.logits[:, P:], s.cfg_scale)
                x0 = gumbel_argmax(logits, s.temperature, ctx.generator)
                if s.remasking == "low_confidence":
                    probs = torch.softmax(logits, dim=-1)
                    conf = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
                else:
                    conf = torch.rand(x0.shape, generator=ctx.generator, device=x0.device)
                masked = ctx.canvas == ctx.mask_id
                conf[end:] = -torch.inf
                conf = torch.where(masked, conf, -torch.inf)
                # Rank over prompt + canvas, as the reference does, so ties break alike.
                full = torch.cat([conf.new_full((P,), -torch.inf), conf])
                chosen = torch.topk(full, k).indices - P
                ctx.canvas[chosen] = x0[chosen]

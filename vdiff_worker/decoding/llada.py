"""LLaDA's reference sampler: semi-autoregressive blocks, low-confidence or random remasking.

With ``cache`` "prefix" or "dual" the same fixed schedule runs in Fast-dLLM's cached block
loop (Fast-dLLM's ``threshold=None`` mode).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vdiff_worker.decoding import fastdllm
from vdiff_worker.decoding.base import (
    Among,
    Forward,
    ParamError,
    Settings,
    Steps,
    Strategy,
    blocks,
    call,
    check_filters,
    draw,
    fetch,
    gumbel_argmax,
    masks_in,
    steps_per_block,
    transfer_schedule,
)


def guided(fwd_logits: Tensor, cfg_scale: float) -> Tensor:
    """Unsupervised classifier-free guidance over the (conditional, unconditional) rows."""
    if cfg_scale <= 0.0:
        return fwd_logits[0]
    cond, uncond = fwd_logits[0], fwd_logits[1]
    return uncond + (cfg_scale + 1.0) * (cond - uncond)


def model_call(
    prompt: Tensor,
    canvas: Tensor,
    mask_id: int,
    cfg_scale: float,
    logits: tuple[int, int],
    picks: Tensor | None = None,
) -> Forward:
    """A pass over prompt + canvas; with CFG a second row has the prompt masked."""
    x = torch.cat([prompt, canvas]).unsqueeze(0)
    if cfg_scale > 0.0:
        uncond = x.clone()
        uncond[0, : prompt.numel()] = mask_id
        x = torch.cat([x, uncond])
    pos = torch.arange(x.shape[1]).unsqueeze(0).expand_as(x)
    return Forward(input_ids=x, position_ids=pos, logits=logits, picks=picks)


class LLaDAReference(Strategy):
    name = "reference"
    kinds = ("llada",)
    fields = frozenset(
        {"diffusion_steps", "block_length", "remasking", "cfg_scale", "cache", "top_p", "top_k"}
    )

    @classmethod
    def check(cls, s: Settings) -> None:
        if s.cache != "none":
            # With a cache this is Fast-dLLM's fixed-step loop, which has its own checks.
            fastdllm.FixedSteps.check(s)
            return
        if s.remasking not in ("low_confidence", "random"):
            raise ParamError("remasking", "remasking must be 'low_confidence' or 'random'")
        check_filters(s)

    def cached_models(self) -> frozenset[str]:
        return frozenset() if self.ctx.settings.cache == "none" else frozenset({"main"})

    def run(self) -> Steps:
        ctx, s = self.ctx, self.ctx.settings
        if s.cache != "none":
            yield from fastdllm.FixedSteps(ctx).run()
            return
        P = ctx.prompt.numel()
        spans = blocks(s.gen_length, s.block_length)
        per_block = steps_per_block(s.steps, len(spans))
        for start, end in spans:
            n_masked = int((ctx.canvas[start:end] == ctx.mask_id).sum())
            for k in transfer_schedule(n_masked, per_block):
                if k == 0:
                    continue  # the reference spends a pass that changes nothing here
                block = ctx.canvas[start:end]
                # Logits at the block's masks only; the noise is drawn for the whole block.
                masks = masks_in(ctx, start, end)
                among = Among(masks, end - start)
                out = yield from call(
                    model_call(
                        ctx.prompt,
                        ctx.canvas,
                        ctx.mask_id,
                        s.cfg_scale,
                        (P + start, P + end),
                        P + start + masks,
                    )
                )
                logits = guided(out.logits, s.cfg_scale)
                x0 = gumbel_argmax(logits, s.temperature, ctx.generator, s.top_p, s.top_k, among)
                if s.remasking == "low_confidence":
                    probs = torch.softmax(logits, dim=-1)
                    conf = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
                else:
                    conf = draw(among, x0.shape, ctx.generator, torch.float32)
                x0, conf = yield from fetch(x0, conf)
                # Rank over prompt + canvas, as the reference does, so ties break alike.
                full = conf.new_full((P + s.gen_length,), -torch.inf)
                full[P + start + masks] = conf
                chosen = torch.topk(full, k).indices - P - start
                tokens = block.clone()
                tokens[masks] = x0
                block[chosen] = tokens[chosen]

"""Plain autoregressive decoding for causal checkpoints (the transformers fallback)."""

from __future__ import annotations

import torch
from torch import Tensor

from vdiff_worker.decoding.base import (
    Cached,
    Forward,
    ParamError,
    Settings,
    Steps,
    Strategy,
    call,
    fetch,
)


def sample(logits: Tensor, s: Settings, gen: torch.Generator) -> Tensor:
    """Greedy at temperature 0; otherwise temperature, then top-k, then top-p (as vLLM)."""
    if s.temperature == 0.0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / s.temperature
    if s.top_k is not None and s.top_k > 0:
        kth = torch.topk(scaled, min(s.top_k, scaled.shape[-1])).values[..., -1, None]
        scaled = scaled.masked_fill(scaled < kth, -torch.inf)
    if s.top_p < 1.0:
        probs, order = torch.sort(torch.softmax(scaled, dim=-1), descending=True)
        drop = probs.cumsum(dim=-1) - probs > s.top_p  # keep the smallest set reaching top_p
        scaled = scaled.scatter(-1, order, torch.where(drop, -torch.inf, scaled.gather(-1, order)))
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


class Autoregressive(Strategy):
    """One token per forward pass with a KV cache; `reference` for causal models."""

    name = "reference"
    kinds = ("ar",)
    fields = frozenset({"top_p", "top_k"})

    @classmethod
    def check(cls, s: Settings) -> None:
        if s.cfg_scale > 0.0:
            raise ParamError("cfg_scale", "cfg_scale applies to diffusion models only")

    def cached_models(self) -> frozenset[str]:
        return frozenset({"main"})

    def run(self) -> Steps:
        ctx, s = self.ctx, self.ctx.settings
        P = ctx.prompt.numel()
        ids = ctx.prompt.unsqueeze(0)
        pos = torch.arange(P).unsqueeze(0)
        out = yield from call(
            Forward(
                input_ids=ids, position_ids=pos, logits=(P - 1, P), cached=Cached(write=0, keys=P)
            )
        )
        for i in range(s.gen_length):
            (tok,) = yield from fetch(sample(out.logits[0, -1], s, ctx.generator))
            ctx.canvas[i] = tok
            if i + 1 == s.gen_length:
                return
            out = yield from call(
                Forward(
                    input_ids=tok.view(1, 1),
                    position_ids=pos.new_tensor([[P + i]]),
                    cached=Cached(write=P + i, keys=P + i + 1),
                )
            )

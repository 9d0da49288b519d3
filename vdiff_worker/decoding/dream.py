"""Dream's reference sampler (``diffusion_generate``): one block, a time schedule from 1 to eps.

Each step reads the model's predictions for the masked positions (Dream predicts position i
at output i - 1), scores them by ``alg`` and commits as many as the schedule
``linspace(1, eps, steps + 1)`` says: a fraction 1 - s/t of the masks still left, all of them
at the last step.

- ``origin``: each masked position is committed with probability 1 - s/t, independently.
- ``maskgit_plus``: confidence = top-1 probability; ``topk_margin``: top-1 minus top-2;
  ``entropy``: negative entropy. The most confident go first, or with ``alg_temp`` a
  softmax(confidence / alg_temp) draw without replacement.
"""

from __future__ import annotations

from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from vdiff_common.protocol import DreamAlg
from vdiff_worker.decoding.base import (
    ParamError,
    Settings,
    Steps,
    Strategy,
    call,
    fetch,
    full_sequence,
    on_device,
)

ALGS: tuple[DreamAlg, ...] = get_args(DreamAlg)
EPS = 1e-3
DEFAULT_TOP_K = 50


def filter_logits(logits: Tensor, temperature: float, top_p: float, top_k: int | None) -> Tensor:
    """Dream's temperature scaling, then nucleus and top-k filtering (to the dtype's min)."""
    if temperature > 0.0:
        logits = logits / temperature
    low = torch.finfo(logits.dtype).min
    if top_p < 1.0:
        ranked, order = torch.sort(logits, descending=True)
        cum = torch.cumsum(torch.softmax(ranked, dim=-1), dim=-1)
        drop = cum > top_p
        # Keep the token that crosses top_p: shift the drop mask right by one.
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), low)
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, low)
    return logits


def sample_tokens(
    logits: Tensor,
    s: Settings,
    gen: torch.Generator,
    alg: str = "maskgit_plus",
    top_k: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Dream's ``sample_tokens``: (confidence, token) per row, confidence by `alg`."""
    probs = torch.softmax(filter_logits(logits, s.temperature, s.top_p, top_k), dim=-1)
    if s.temperature > 0.0:
        x0 = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        conf = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        conf, x0 = probs.max(dim=-1)
    if alg == "topk_margin":
        top2 = torch.sort(probs, dim=-1, descending=True).values[:, :2]
        conf = top2[:, 0] - top2[:, 1]
    elif alg == "entropy":
        conf = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return conf, x0


class DreamReference(Strategy):
    name = "reference"
    kinds = ("dream",)
    fields = frozenset({"diffusion_steps", "alg", "alg_temp", "top_p", "top_k"})

    @classmethod
    def check(cls, s: Settings) -> None:
        if s.alg not in ALGS:
            raise ParamError("alg", f"alg must be one of {', '.join(ALGS)}")
        if s.alg_temp is not None and s.alg_temp < 0.0:
            raise ParamError("alg_temp", "alg_temp must not be negative")
        if s.cfg_scale > 0.0:
            raise ParamError("cfg_scale", "Dream's sampler has no classifier-free guidance")
        if s.cache != "none":
            raise ParamError(
                "cache",
                "Dream's reference sampler has no cache; use "
                "decoding 'threshold' or 'factor' on a LLaDA model",
            )
        if s.remasking != "low_confidence":
            raise ParamError("remasking", "Dream chooses positions by 'alg', not 'remasking'")

    def run(self) -> Steps:
        ctx, s = self.ctx, self.ctx.settings
        P, mask = ctx.prompt.numel(), ctx.mask_id
        times = torch.linspace(1, EPS, s.steps + 1)
        for i in range(s.steps):
            masked = ctx.canvas == mask
            n_masked = masked.sum()
            if int(n_masked) == 0:
                break
            t, s_next = times[i], times[i + 1]
            last = i == s.steps - 1
            # The reference's arithmetic: an int64 count times a float32 fraction, truncated.
            n = int(n_masked) if last else int(n_masked * (1 - s_next / t))
            if s.alg != "origin" and n == 0:
                continue  # the reference spends a pass here that commits nothing
            # The predictions of the masked positions only (Dream's are shifted by one).
            picks = P - 1 + masked.nonzero()[:, 0]
            out = yield from call(
                full_sequence(ctx.prompt, ctx.canvas, (P - 1, P - 1 + s.gen_length), picks=picks)
            )
            logits = out.logits[0]
            if s.alg == "origin":
                yield from self._origin(logits, masked, 1.0 if last else float(1 - s_next / t))
            else:
                yield from self._ranked(logits, masked, n)

    def top_k(self) -> int | None:
        """Dream's generation config, as the transformers versions it was released for read
        it, filters to the top 50 logits whenever a call sets no top_k, even at
        temperature 0."""
        top_k = self.ctx.settings.top_k
        return DEFAULT_TOP_K if top_k is None else top_k

    def _origin(self, logits: Tensor, masked: Tensor, p_transfer: float) -> Steps:
        # Two fetches: which positions go decides which rows are sampled (the reference draws
        # its tokens for those rows only, so the random stream depends on it).
        ctx = self.ctx
        draw = torch.rand((logits.shape[0],), generator=ctx.generator, device=ctx.device)
        (go,) = yield from fetch(draw < p_transfer)
        x0 = torch.full(go.shape, ctx.mask_id, dtype=torch.long)
        if bool(go.any()):
            rows = logits.index_select(0, on_device(go.nonzero()[:, 0], ctx))
            (x0[go],) = yield from fetch(
                sample_tokens(rows, ctx.settings, ctx.generator, top_k=self.top_k())[1]
            )
        ctx.canvas[masked] = x0

    def _ranked(self, logits: Tensor, masked: Tensor, n: int) -> Steps:
        ctx, s = self.ctx, self.ctx.settings
        conf, x0 = sample_tokens(logits, s, ctx.generator, s.alg, self.top_k())
        if not s.alg_temp:
            x0, conf = yield from fetch(x0, conf)
            chosen = torch.topk(conf, n).indices
        else:
            weights = F.softmax(conf / s.alg_temp, dim=-1)
            x0, chosen = yield from fetch(
                x0, torch.multinomial(weights, n, generator=ctx.generator)
            )
        update = torch.full_like(x0, ctx.mask_id)
        update[chosen] = x0[chosen]
        ctx.canvas[masked] = update

"""Fast-dLLM (NVlabs): confidence-aware parallel decoding and block-wise approximate KV caches.

Inside each semi-autoregressive block, a transfer rule picks which masked positions to commit
after each pass: a fixed schedule (LLaDA's), every position whose confidence clears a
threshold, or the ``factor`` rule (the n-th most confident position needs confidence at least
1 - factor / (n + 1)). Confidences are softmax probabilities taken in float64, as Fast-dLLM does.

Caches (``cache``):

- ``none``: every pass runs over prompt + canvas.
- ``prefix``: the block's first pass runs over everything and keeps the keys/values before the
  block; later passes run over the block and everything after it, attending to that prefix.
- ``dual``: as ``prefix``, but also keeps the keys/values after the block, so later passes
  run over the block alone.

The reference's cache loops spend one more pass after a block is complete when its first pass
completed it; that pass changes nothing, and is not made here.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import get_args

import torch
from torch import Tensor

from vdiff_common.protocol import Cache
from vdiff_worker.decoding.base import (
    Among,
    Cached,
    ParamError,
    Settings,
    Steps,
    Strategy,
    blocks,
    cached_span,
    call,
    check_filters,
    draw,
    fetch,
    full_sequence,
    gumbel_argmax,
    masks_in,
    steps_per_block,
    transfer_schedule,
)

CACHES: tuple[Cache, ...] = get_args(Cache)

# A transfer rule: (confidences over the reference's span, -inf where not eligible; step index
# in the block) -> positions in that span to commit, most confident first.
Rule = Callable[[Tensor, int], Tensor]


def candidates(
    logits: Tensor, s: Settings, gen: torch.Generator, among: Among | None = None
) -> tuple[Tensor, Tensor]:
    """Fast-dLLM's candidate token per position and its confidence, where the logits are;
    with ``among``, the logits are those rows of the block and the noise is the block's."""
    x0 = gumbel_argmax(logits, s.temperature, gen, s.top_p, s.top_k, among)
    if s.remasking == "low_confidence":
        probs = torch.softmax(logits.to(torch.float64), dim=-1)
        return x0, torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    return x0, draw(among, x0.shape, gen, torch.float64)


def fixed_rule(schedule: list[int]) -> Rule:
    """LLaDA's schedule: the k most confident positions at each step."""
    return lambda conf, step: torch.topk(conf, schedule[step]).indices


def threshold_rule(threshold: float) -> Rule:
    """The most confident position, plus every other one at or above the threshold."""

    def rule(conf: Tensor, step: int) -> Tensor:
        n = int(torch.isfinite(conf).sum())
        values, order = torch.topk(conf, n)
        keep = values >= threshold
        keep[0] = True
        return order[keep]

    return rule


def factor_rule(factor: float) -> Rule:
    """Commit the n most confident positions while the i-th of them (1-based) has confidence
    at least 1 - factor / (i + 1); the first always goes."""

    def rule(conf: Tensor, step: int) -> Tensor:
        n = int(torch.isfinite(conf).sum())
        ranked = torch.sort(conf[torch.isfinite(conf)], descending=True).values
        bars = 1.0 - factor / (
            torch.arange(1, n + 1, dtype=torch.float64, device=conf.device) + 1.0
        )
        bars[0] = -1.0
        below = (ranked < bars).nonzero()
        k = int(below[0]) if below.numel() else n - 1
        # The reference's count: when the scan stops at the last position (failing there or
        # not) it takes them all.
        if k == 0 or k == n - 1:
            k += 1
        return torch.topk(conf, k).indices

    return rule


class BlockDecoder(Strategy, abc.ABC):
    """Fast-dLLM's block loop over one of the three cache modes; subclasses give the rule."""

    kinds = ("llada",)

    @classmethod
    def check(cls, s: Settings) -> None:
        if s.cache not in CACHES:
            raise ParamError("cache", f"cache must be one of {', '.join(CACHES)}")
        if s.remasking not in ("low_confidence", "random"):
            raise ParamError("remasking", "remasking must be 'low_confidence' or 'random'")
        if s.cfg_scale > 0.0:
            raise ParamError(
                "cfg_scale",
                f"decoding '{cls.name}' has no classifier-free "
                "guidance; use decoding 'reference' without a cache",
            )
        check_filters(s)

    @abc.abstractmethod
    def rule(self, n_masked: int) -> Rule:
        """The transfer rule for a block that starts with `n_masked` masks."""

    def cap(self) -> int | None:
        """At most this many tokens committed per pass (None: no cap)."""
        return self.ctx.settings.max_parallel

    def cached_models(self) -> frozenset[str]:
        return frozenset() if self.ctx.settings.cache == "none" else frozenset({"main"})

    def run(self) -> Steps:
        ctx, s = self.ctx, self.ctx.settings
        P, N = ctx.prompt.numel(), s.gen_length
        for start, end in blocks(N, s.block_length):
            n_masked = int((ctx.canvas[start:end] == ctx.mask_id).sum())
            if n_masked == 0:
                continue
            rule = self.rule(n_masked)
            # The block's first pass runs over everything (with a cache: filling the slot).
            # The reference ranks over prompt + canvas there; a prompt never competes.
            cached = None if s.cache == "none" else Cached(write=0, keys=P + N)
            step = 0
            while (masks := masks_in(ctx, start, end)).numel() and (step == 0 or s.cache == "none"):
                out = yield from call(
                    full_sequence(
                        ctx.prompt, ctx.canvas, (P + start, P + end), cached, P + start + masks
                    )
                )
                yield from self._commit(
                    out.logits[0], start, end, masks, rule, step, origin=-P, length=P + N
                )
                step += 1
            # Cached passes rewrite the block (dual) or the block and all after it (prefix)
            # in the slot, and attend to the whole of it.
            stop = end if s.cache == "dual" else N
            while (masks := masks_in(ctx, start, end)).numel():
                out = yield from call(
                    cached_span(ctx.prompt, ctx.canvas, start, stop, (0, end - start), masks)
                )
                yield from self._commit(
                    out.logits[0], start, end, masks, rule, step, origin=start, length=stop - start
                )
                step += 1

    def _commit(
        self,
        logits: Tensor,
        start: int,
        end: int,
        masks: Tensor,
        rule: Rule,
        step: int,
        origin: int,
        length: int,
    ) -> Steps:
        """Commit the rule's choice among the masks of the block [start, end) (``masks``,
        whose predictions ``logits`` holds, in order). The rule ranks a vector as the
        reference lays it out (``length`` slots from canvas position ``origin``; -inf where
        not eligible), so that ties break alike; the noise is drawn for the whole block, as
        the reference does."""
        ctx = self.ctx
        span = ctx.canvas[start:end]
        among = Among(masks, end - start)
        x0, conf = yield from fetch(*candidates(logits, ctx.settings, ctx.generator, among))
        ranked = conf.new_full((length,), -torch.inf)
        ranked[start - origin + masks] = conf
        chosen = rule(ranked, step) + origin - start
        cap = self.cap()
        if cap is not None:
            chosen = chosen[:cap]
        tokens = span.clone()
        tokens[masks] = x0
        span[chosen] = tokens[chosen]


class Threshold(BlockDecoder):
    name = "threshold"
    fields = frozenset({"block_length", "remasking", "cache", "threshold", "top_p", "top_k"})

    @classmethod
    def check(cls, s: Settings) -> None:
        super().check(s)
        if s.threshold is None:
            raise ParamError("threshold", "decoding 'threshold' needs a threshold")

    def rule(self, n_masked: int) -> Rule:
        assert self.ctx.settings.threshold is not None
        return threshold_rule(self.ctx.settings.threshold)


class Factor(BlockDecoder):
    name = "factor"
    fields = frozenset({"block_length", "remasking", "cache", "factor", "top_p", "top_k"})

    def rule(self, n_masked: int) -> Rule:
        return factor_rule(self.ctx.settings.factor)


class FixedSteps(BlockDecoder):
    """LLaDA's fixed schedule inside Fast-dLLM's cache loops (LLaDA reference with a cache)."""

    name = "reference"

    def rule(self, n_masked: int) -> Rule:
        s = self.ctx.settings
        per_block = steps_per_block(s.steps, len(blocks(s.gen_length, s.block_length)))
        # A step that would commit nothing is not taken (the reference spends a pass on it).
        return fixed_rule([k for k in transfer_schedule(n_masked, per_block) if k > 0])

    def cap(self) -> int | None:
        return None

"""LLaDA2.x block diffusion (inclusionAI LLaDA2.0 ``generate``) over an exact block cache.

The context is cut into blocks of ``block_length`` from position 0, so the prompt's tail
shares the first decoded block, and attention is block-causal: a block sees itself and the
blocks before it. A finished block's keys and values therefore never change, and caching
them is exact (unlike LLaDA 1's approximate dual cache).

Caches (``cache``):

- ``none``: every pass runs over the whole window up to the current block's end, as the
  reference does.
- ``prefix`` (the default): the sequence's slot holds the keys and values of every finished
  block and a pass runs over the current block alone. A block's passes write its slot
  positions; when the last one saw the block's final tokens they are final, otherwise the
  next block's first pass runs over both blocks and rewrites them. The first pass covers
  the prompt's whole blocks too: the prompt is written once, as part of that pass.

The LLaDA2.0 rule (:class:`LLaDA2Reference`): ``diffusion_steps`` steps per block (capped at
``max_tokens``), each meant to commit its share of the block (an even split, remainder
first); a step commits every masked position whose confidence is strictly above
``threshold`` if there are at least its share of them, else its share by confidence. After
a block holding an end token, decoding stops.
"""

from __future__ import annotations

import abc
from collections.abc import Generator
from typing import Any

import torch
from torch import Tensor

from vdiff_worker.decoding.base import (
    Cached,
    Context,
    Forward,
    ParamError,
    Settings,
    Step,
    Steps,
    Strategy,
    call,
    check_filters,
    fetch,
    top_filtered,
    transfer_schedule,
)


def candidates(logits: Tensor, s: Settings, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """LLaDA2's token per position and its probability, where the logits are: the argmax of
    the float32 softmax at temperature 0, else a draw from the filtered, tempered softmax."""
    if s.temperature == 0.0:
        probs = torch.softmax(logits.float(), dim=-1)
        x0 = probs.argmax(dim=-1)
    else:
        filtered = top_filtered(logits.float() / s.temperature, s.top_p, s.top_k)
        probs = torch.softmax(filtered, dim=-1)
        x0 = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    return x0, torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)


def most_confident(conf: Tensor, k: int) -> Tensor:
    """A boolean mask of the k highest confidences (-inf where not eligible)."""
    chosen = torch.zeros(conf.shape, dtype=torch.bool)
    chosen[torch.topk(conf, k).indices] = True
    return chosen


class BlockCausal(Strategy, abc.ABC):
    """The block loop and the block cache; subclasses give the rule inside a block."""

    kinds = ("llada2",)

    @classmethod
    def block_length(cls, requested: int, gen_length: int) -> int:
        return requested  # blocks are the model's, counted from position 0

    @classmethod
    def positions(cls, prompt: int, s: Settings) -> int:
        return -(-(prompt + s.gen_length) // s.block_length) * s.block_length

    @classmethod
    def check(cls, s: Settings) -> None:
        if s.cache not in ("none", "prefix"):
            raise ParamError(
                "cache",
                "LLaDA2 caches finished blocks exactly: cache must be 'prefix' (the default) "
                "or 'none' (nothing after a block is attended to, so there is no 'dual')",
            )
        check_filters(s)

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        P = ctx.prompt.numel()
        length = self.positions(P, ctx.settings)
        # The whole context: prompt, the answer, and masks up to the last block's end.
        self.seq = torch.cat([ctx.prompt, torch.full((length - P,), ctx.mask_id)])
        self.fresh = 0  # slot positions before this hold final keys and values
        self.written: Tensor | None = None  # the current block as its last pass saw it

    def cached_models(self) -> frozenset[str]:
        return frozenset() if self.ctx.settings.cache == "none" else frozenset({"main"})

    def run(self) -> Steps:
        bl, P = self.ctx.settings.block_length, self.ctx.prompt.numel()
        for start in range(P // bl * bl, self.seq.numel(), bl):
            end = start + bl
            self.written = None
            yield from self.block(start, end)
            if self.written is not None:
                self.fresh = end if torch.equal(self.written, self.seq[start:end]) else start
            if self.settled is not None:
                self.settled = min(end - P, self.ctx.settings.gen_length)
            if self.stops(end):
                return

    @abc.abstractmethod
    def block(self, start: int, end: int) -> Steps:
        """Decode the block [start, end) of ``seq`` through ``forward`` and ``commit``."""

    def stops(self, end: int) -> bool:
        """Whether decoding ends after the block ending at ``end``."""
        return False

    def forward(self, start: int, end: int) -> Generator[Step, Any, tuple[Tensor, Tensor]]:
        """One pass for the block [start, end): each of its positions' candidate token and
        probability, on the host."""
        ctx, s = self.ctx, self.ctx.settings
        lo = 0 if s.cache == "none" else min(self.fresh, start)
        cached = None if s.cache == "none" else Cached(write=lo, keys=end)
        out = yield from call(
            Forward(
                input_ids=self.seq[lo:end].unsqueeze(0),
                position_ids=torch.arange(lo, end).unsqueeze(0),
                cached=cached,
                logits=(start - lo, end - lo),
                # Over the current block alone, block-causal is attending to every key: the
                # plain kernel serves it.
                block=s.block_length if lo < start else 0,
            )
        )
        if cached is not None:
            self.fresh = start  # the pass rewrote the finished blocks it covered
        self.written = self.seq[start:end].clone()
        x0, p = yield from fetch(*candidates(out.logits[0], s, ctx.generator))
        return x0, p

    def commit(self, start: int, end: int, chosen: Tensor, x0: Tensor) -> None:
        span = self.seq[start:end]
        span[chosen] = x0[chosen]
        P = self.ctx.prompt.numel()
        self.ctx.canvas.copy_(self.seq[P : P + self.ctx.settings.gen_length])


class LLaDA2Reference(BlockCausal):
    name = "reference"
    fields = frozenset({"diffusion_steps", "block_length", "threshold", "cache", "top_p", "top_k"})

    @classmethod
    def default_steps(cls, gen_length: int, block_length: int) -> int:
        return min(block_length, gen_length)  # one step per token of a block

    def block(self, start: int, end: int) -> Steps:
        ctx, s = self.ctx, self.ctx.settings
        assert s.threshold is not None
        steps = min(s.steps, s.gen_length)
        schedule = transfer_schedule(s.block_length, steps)
        for step in range(steps):
            active = self.seq[start:end] == ctx.mask_id
            if not active.any():
                return
            x0, p = yield from self.forward(start, end)
            conf = torch.where(active, p, -torch.inf)
            high = conf > s.threshold
            k = schedule[step]
            if int(high.sum()) >= k:
                chosen = high
            else:
                chosen = most_confident(conf, min(k, int(active.sum())))
            self.commit(start, end, chosen, x0)

    def stops(self, end: int) -> bool:
        P = self.ctx.prompt.numel()
        window = self.seq[P:end].tolist()
        return any(t in self.ctx.eos_ids for t in window)

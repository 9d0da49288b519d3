"""Fast-dLLM (NVlabs) on Dream: ``alg='confidence_threshold'`` with its three cache modes.

Reproduces ``dream/model/generation_utils.py`` (cache ``none``) and
``dream/model/generation_utils_block.py`` (``prefix`` and ``dual``) at NVlabs/Fast-dLLM 24cc59e.
Dream predicts canvas position g at input position P + g - 1 (its logits are shifted by one).
Confidence is the top probability of the softmax in the logits' dtype, after Dream's top-p /
top-k filter when the request sets one (unset: no filter, as Fast-dLLM's eval calls it); the
threshold is compared in that dtype too, as the reference's tensor-scalar comparison does.

- ``none`` is not block by block: every pass runs over prompt + canvas and ranks all masked
  positions. Step i aims at gen_length / steps tokens (remainder first) plus what earlier steps
  fell short by; the most confident goes always, the next ones of that top-k only when their
  confidence reaches the threshold. After the last step, each pass aims at all remaining masks,
  until none is left.
- ``prefix`` / ``dual``: per block, one pass over everything (filling the cache slot) commits
  the block's first position from its argmax; then cached passes over the block and all after
  it (prefix) or the block alone (dual) each commit the block's most confident mask plus every
  other mask of the block at or above the threshold.

The reference spends passes that commit nothing (cache ``none`` when its step count grows past
what the masks need; a block of one position); they are not made here.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, get_args

import torch
from torch import Tensor

from vdiff_common.protocol import Cache
from vdiff_worker.decoding.base import (
    Cached,
    ParamError,
    Settings,
    Step,
    Steps,
    Strategy,
    blocks,
    cached_span,
    call,
    check_filters,
    fetch,
    full_sequence,
    masks_in,
    transfer_schedule,
)
from vdiff_worker.decoding.dream import sample_tokens

CACHES: tuple[Cache, ...] = get_args(Cache)


class DreamThreshold(Strategy):
    name = "threshold"
    kinds = ("dream",)
    fields = frozenset({"block_length", "cache", "threshold", "diffusion_steps", "top_p", "top_k"})

    @classmethod
    def check(cls, s: Settings) -> None:
        if s.cache not in CACHES:
            raise ParamError("cache", f"cache must be one of {', '.join(CACHES)}")
        if s.threshold is None:
            raise ParamError("threshold", "decoding 'threshold' needs a threshold")
        if s.cfg_scale > 0.0:
            raise ParamError(
                "cfg_scale", "Dream's Fast-dLLM sampler has no classifier-free guidance"
            )
        if s.remasking != "low_confidence":
            raise ParamError("remasking", "Dream's Fast-dLLM sampler ranks by confidence only")
        check_filters(s)

    @classmethod
    def default_steps(cls, gen_length: int, block_length: int) -> int:
        # Fast-dLLM's Dream eval (eval_gsm8k.sh): steps = length / block_length.
        return max(1, gen_length // block_length)

    def cached_models(self) -> frozenset[str]:
        return frozenset() if self.ctx.settings.cache == "none" else frozenset({"main"})

    def run(self) -> Steps:
        if self.ctx.settings.cache == "none":
            yield from self._whole_canvas()
        else:
            yield from self._blocks()

    def _whole_canvas(self) -> Steps:
        ctx, s = self.ctx, self.ctx.settings
        P, N = ctx.prompt.numel(), s.gen_length
        # The reference asserts steps divides gen_length and takes gen_length // steps per
        # step; the even split with the remainder first is the same there and total otherwise.
        schedule = transfer_schedule(N, max(1, s.steps))
        carried, step = 0, 0
        while (masks := masks_in(ctx, 0, N)).numel():
            target = (schedule[step] if step < len(schedule) else 0) + carried
            step += 1
            if target == 0:
                continue  # the reference's pass here commits nothing
            out = yield from call(
                full_sequence(ctx.prompt, ctx.canvas, (P - 1, P - 1 + N), picks=P - 1 + masks)
            )
            # Ranked over prompt + canvas as the reference lays it out, so that ties break
            # alike; the prompt never competes. Until the last step, target never exceeds the
            # masks left (the shortfall is what the schedule still owes), and after it, target
            # is all of them, so no -inf position is ever taken.
            committed = yield from self._commit(
                out.logits[0], 0, N, masks, target, origin=-P, length=P + N
            )
            carried = target - committed

    def _blocks(self) -> Steps:
        ctx, s = self.ctx, self.ctx.settings
        P, N = ctx.prompt.numel(), s.gen_length
        for start, end in blocks(N, s.block_length):
            if not masks_in(ctx, start, end).numel():
                continue
            # The full pass refreshes the slot and commits the block's first position
            # unconditionally, from the prediction at input P + start - 1.
            out = yield from call(
                full_sequence(
                    ctx.prompt, ctx.canvas, (P + start - 1, P + start), Cached(write=0, keys=P + N)
                )
            )
            (x0,) = yield from fetch(
                sample_tokens(out.logits[0], s, ctx.generator, top_k=s.top_k)[1]
            )
            ctx.canvas[start] = x0[0]
            stop = end if s.cache == "dual" else N
            while (masks := masks_in(ctx, start + 1, end)).numel():
                # The block's first position is committed, so the cached pass's own shift
                # quirk (its position 0 reading output 0) never matters: position g of the
                # block reads output g - start - 1 of this pass.
                out = yield from call(
                    cached_span(
                        ctx.prompt, ctx.canvas, start, stop, (0, end - start - 1), picks=masks
                    )
                )
                # Ranked over the pass's span (the block and, with prefix, all after it, -inf
                # outside the block), as the reference lays it out.
                yield from self._commit(
                    out.logits[0],
                    start + 1,
                    end,
                    masks,
                    int(masks.numel()),
                    origin=start,
                    length=stop - start,
                )

    def _commit(
        self,
        logits: Tensor,
        start: int,
        end: int,
        masks: Tensor,
        target: int,
        origin: int,
        length: int,
    ) -> Generator[Step, Any, int]:
        """Among the masks of canvas [start, end) (``masks``, whose predictions ``logits``
        holds, in order), take the ``target`` most confident; commit the first and those of
        the rest at or above the threshold. Returns how many were committed.

        The ranking vector has `length` slots from canvas position `origin`, -inf except at
        the masks, in the dtype of the confidences."""
        ctx, s = self.ctx, self.ctx.settings
        assert s.threshold is not None  # check() refuses a missing one
        span = ctx.canvas[start:end]
        conf, x0 = yield from fetch(*sample_tokens(logits, s, ctx.generator, top_k=s.top_k))
        ranked = conf.new_full((length,), -torch.inf)
        ranked[start - origin + masks] = conf
        values, order = torch.topk(ranked, target)
        # A tensor-scalar comparison in the confidences' dtype: the threshold rounds to it.
        keep = values >= s.threshold
        keep[0] = True
        if s.max_parallel is not None:
            keep[s.max_parallel :] = False
        chosen = order[keep] + origin - start
        tokens = torch.full_like(span, ctx.mask_id)
        tokens[masks] = x0
        span[chosen] = tokens[chosen]
        return int(keep.sum())

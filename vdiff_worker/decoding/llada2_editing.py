"""LLaDA2.1's editing rule (inclusionAI LLaDA2.1 ``generate``) over LLaDA2's block loop.

Each pass over a block commits every mask whose confidence is strictly above ``threshold``,
or the ``num_to_transfer`` most confident masks when fewer clear it, and at once edits any
token committed earlier in the block (never a prompt token) whose prediction has changed with
probability strictly above ``editing_threshold``. Once no mask is left, each further pass is
a post step; the block ends at the first pass that edits nothing, or when the post steps
would exceed ``max_post_steps``. Blocks before the current one are never edited, so only
finished blocks are streamed. There is no step schedule: ``diffusion_steps`` does not apply.
"""

from __future__ import annotations

import torch

from vdiff_worker.decoding.base import Context, Steps
from vdiff_worker.decoding.llada2 import BlockCausal, most_confident


class LLaDA2Editing(BlockCausal):
    name = "editing"
    fields = frozenset(
        {
            "block_length",
            "threshold",
            "editing_threshold",
            "max_post_steps",
            "num_to_transfer",
            "cache",
            "top_p",
            "top_k",
        }
    )

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.settled = 0  # an edit may still change the current block

    def block(self, start: int, end: int) -> Steps:
        ctx, s = self.ctx, self.ctx.settings
        assert s.threshold is not None
        prompt = torch.arange(start, end) < ctx.prompt.numel()
        post = 0
        while True:
            before = self.seq[start:end].clone()
            active = before == ctx.mask_id
            if not active.any():
                post += 1
            if post > s.max_post_steps:
                return
            x0, p = yield from self.forward(start, end)
            chosen = torch.zeros(active.shape, dtype=torch.bool)
            if active.any():
                conf = torch.where(active, p, -torch.inf)
                high = (conf > s.threshold) & active
                if int(high.sum()) >= s.num_to_transfer:
                    chosen = high
                else:
                    chosen = most_confident(conf, min(s.num_to_transfer, int(active.sum())))
            edits = (p > s.editing_threshold) & ~active & ~prompt & (x0 != before)
            self.commit(start, end, chosen | edits, x0)
            if not active.any() and not edits.any():
                return

"""Models that bring their own sampler (DiffusionGemma through transformers): one generate call.

The call runs the model's whole block-diffusion loop at once, so such a request is not batched
with others and streams its answer in one chunk; usage counts it as one model call. The model's
generate draws from torch's global generator: the runner seeds it with the sequence's seed
(the request's ``seed`` + the choice's index, as every strategy) right before the call.
"""

from __future__ import annotations

import torch

from vdiff_common.protocol import SamplingParams
from vdiff_worker.decoding.base import Forward, ParamError, Steps, Strategy, call, fetch


class ModelGenerate(Strategy):
    name = "reference"
    kinds = ("diffusion_gemma",)

    @classmethod
    def refuse_unused(cls, params: SamplingParams, kind: str) -> None:
        super().refuse_unused(params, kind)
        # The model's generate has its own temperature schedule, so a request temperature
        # would not mean what it says.
        if params.temperature is not None:
            raise ParamError(
                "temperature",
                f"'temperature' does not apply to {kind} models: their own "
                "generate sets the sampling schedule",
            )

    def run(self) -> Steps:
        ctx = self.ctx
        ids = ctx.prompt.unsqueeze(0)
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        out = yield from call(
            Forward(
                input_ids=ids,
                position_ids=pos,
                new_tokens=ctx.settings.gen_length,
                seed=ctx.generator.initial_seed(),
            )
        )
        assert out.tokens is not None
        (tokens,) = yield from fetch(out.tokens[0, : ctx.settings.gen_length])
        ctx.canvas[: tokens.numel()] = tokens

"""APD, adaptive parallel decoding (Israel et al.): a dLLM drafts, a small AR model verifies.

The paper drafts with Dream; LLaDA drafts the same way (its outputs are not shifted).
Each round the diffusion model drafts every masked position up to the lookahead at once, left
to right; the autoregressive verifier (same tokenizer) scores the draft in one causal pass.
The longest prefix of the draft that agrees with the greedy choice of the mixture
R * dLLM logits + (1 - R) * verifier logits is committed (always at least one token), so the
number of tokens per round adapts to how much the two models agree.

- ``apd_mixture_weight`` R: the weight of the diffusion model in the mixture.
- ``apd_kv_window`` W: with it, the diffusion model keeps keys/values and recomputes only the
  last W - 1 committed positions, the ones committed last round and the masks; without it every
  round is a full pass.
- ``apd_max_lookahead`` M: the draft covers at most M positions past the committed prefix.

The verifier keeps a cache of the committed prefix; the prediction for the first position of
the next draft comes from the round before, as in the reference (which, when a round accepts
the whole draft, carries the prediction for the draft's last position instead).
"""

from __future__ import annotations

from typing import ClassVar

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
    gumbel_argmax,
)
from vdiff_worker.decoding.dream import filter_logits


def mixture(dllm: Tensor, verifier: Tensor, weight: float) -> Tensor:
    """The greedy choice of R * dLLM logits + (1 - R) * verifier logits, per position."""
    vocab = min(dllm.shape[-1], verifier.shape[-1])
    return (weight * dllm[:, :vocab] + (1.0 - weight) * verifier[:, :vocab]).argmax(dim=-1)


def accepted(draft: Tensor, target: Tensor) -> int:
    """Length of the draft's prefix that the mixture's choice agrees with (>= 1)."""
    agree = draft == target
    agree[0] = True
    return int(torch.cumprod(agree.long(), dim=0).sum())


class APD(Strategy):
    name = "apd"
    kinds = ("dream",)
    # Output index of the prediction for canvas position g is g - shift: Dream predicts the
    # next token (as the AR model it was initialised from), LLaDA the token at the position.
    shift: ClassVar[int] = 1
    fields = frozenset(
        {"apd_mixture_weight", "apd_kv_window", "apd_max_lookahead", "top_p", "top_k"}
    )

    @classmethod
    def check(cls, s: Settings) -> None:
        if "verifier" not in s.models:
            raise ParamError(
                "decoding",
                "decoding 'apd' needs a verifier model; this server "
                "was started without --enable-apd --apd-verifier DIR",
            )
        if not 0.0 <= s.apd_mixture_weight <= 1.0:
            raise ParamError("apd_mixture_weight", "apd_mixture_weight must be within [0, 1]")
        for field, value in (
            ("apd_kv_window", s.apd_kv_window),
            ("apd_max_lookahead", s.apd_max_lookahead),
        ):
            if value is not None and value < 1:
                raise ParamError(field, f"{field} must be at least 1")
        if s.cfg_scale > 0.0:
            raise ParamError("cfg_scale", "APD has no classifier-free guidance")
        if s.cache != "none":
            raise ParamError("cache", "APD keeps its own caches; use apd_kv_window")
        if s.remasking != "low_confidence":
            raise ParamError("remasking", "APD commits left to right; 'remasking' does not apply")

    def cached_models(self) -> frozenset[str]:
        window = self.ctx.settings.apd_kv_window is not None
        return frozenset({"main", "verifier"} if window else {"verifier"})

    def run(self) -> Steps:
        ctx, s = self.ctx, self.ctx.settings
        P, N = ctx.prompt.numel(), s.gen_length
        window, lookahead = s.apd_kv_window, s.apd_max_lookahead
        cur = 0  # committed prefix of the canvas
        last = 0  # tokens committed last round
        carry: Tensor | None = None  # verifier's prediction for canvas position `cur`
        while cur < N:
            right = min(cur + lookahead, N) if lookahead is not None else N
            seq = torch.cat([ctx.prompt, ctx.canvas[:right]])
            # With a window the slot keeps the diffusion keys of the last pass; this one
            # recomputes from `left` on.
            left = max(P + cur - window - last + 1, 0) if window is not None and cur else 0
            span = (P + cur - self.shift - left, P + right - self.shift - left)
            out = yield from call(
                Forward(
                    input_ids=seq[left:].unsqueeze(0),
                    position_ids=torch.arange(left, P + right).unsqueeze(0),
                    logits=span,
                    cached=Cached(write=left, keys=P + right) if window is not None else None,
                )
            )
            dllm = out.logits[0]
            (draft,) = yield from fetch(
                gumbel_argmax(
                    filter_logits(dllm, s.temperature, s.top_p, s.top_k),
                    s.temperature,
                    ctx.generator,
                )
            )
            # The verifier's slot holds prompt + committed prefix; it scores the draft.
            if carry is None:
                ids = torch.cat([ctx.prompt, ctx.canvas[:cur], draft])
                vout = yield from call(
                    Forward(
                        input_ids=ids.unsqueeze(0),
                        position_ids=torch.arange(P + right).unsqueeze(0),
                        logits=(P + cur - 1, P + right - 1),
                        model="verifier",
                        cached=Cached(write=0, keys=P + right),
                    )
                )
                verifier = vout.logits[0]
            else:
                vout = yield from call(
                    Forward(
                        input_ids=draft.unsqueeze(0),
                        position_ids=torch.arange(P + cur, P + right).unsqueeze(0),
                        logits=(0, right - cur - 1),
                        model="verifier",
                        cached=Cached(write=P + cur, keys=P + right),
                    )
                )
                verifier = torch.cat([carry.unsqueeze(0), vout.logits[0]])
            (target,) = yield from fetch(mixture(dllm, verifier, s.apd_mixture_weight))
            n = accepted(draft, target)
            if s.max_parallel is not None:
                n = min(n, s.max_parallel)
            carry = verifier[n] if n < verifier.shape[0] else verifier[-1]
            ctx.canvas[cur : cur + n] = draft[:n]
            cur, last = cur + n, n


class LLaDAAPD(APD):
    kinds = ("llada",)
    shift = 0

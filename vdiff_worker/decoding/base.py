"""The one small interface every decoding strategy implements.

A strategy is written like the reference loop it reproduces, except that each model call is a
``yield``: it yields a :class:`Forward` and receives the model output. The engine collects the
pending calls of all active sequences and runs compatible ones as one batched pass, so
strategies never see each other and never know about batching.

The prompt and the canvas live on the host; the logits on the model's device. A strategy
computes on the logits there and yields a :class:`Fetch` for the few values its rule reads
(candidate tokens, their confidences); the engine copies every sequence's fetch of a step in
one transfer, so a step waits for the device once, not once per sequence. A strategy never
reads a device value any other way (``int()``, ``bool()``, ``.tolist()``, boolean indexing).
"""

from __future__ import annotations

import abc
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from vdiff_common.protocol import Decoding, SamplingParams
from vdiff_worker.models.base import ModelOutput

# Fields every strategy honours (the engine and Sequence apply the stop and length ones).
UNIVERSAL = frozenset(
    {"max_tokens", "temperature", "seed", "stop", "stop_token_ids", "decoding", "eos_early_stop"}
)


class ParamError(ValueError):
    """A request parameter this strategy cannot honour; `param` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Cached:
    """How a pass uses its sequence's cache slot for its model: the new tokens' keys are
    written at slot positions ``write`` onwards, and the pass attends to positions
    ``[0, keys)`` (see vdiff_worker.models.kvcache)."""

    write: int
    keys: int


@dataclass
class Forward:
    """One model call: `rows` sequences of equal length (several rows, e.g. for CFG).

    ``logits`` is the span [lo, hi) of input positions whose logits the strategy reads
    (None: all of them); the output's logits cover that span only. ``picks`` narrows it to
    the positions the rule reads (a host tensor of input positions, a block's masks, say):
    the output's logits are then theirs, in that order, and the model's last layer runs on
    those positions only."""

    input_ids: Tensor  # [R, L]
    position_ids: Tensor  # [R, L]
    cached: Cached | None = None
    logits: tuple[int, int] | None = None
    model: str = "main"  # "main" or "verifier"
    # > 0: block-causal attention (LLaDA2) in blocks of this many positions from position 0:
    # each token attends to its own block and the blocks before it. Without a cache the
    # pass's positions start at 0.
    block: int = 0
    # > 0: run the model's own generate for this many new tokens (models served through
    # transformers with a sampler of their own, such as DiffusionGemma); it draws from torch's
    # global generator, which is seeded with ``seed`` first.
    new_tokens: int = 0
    seed: int = 0
    picks: Tensor | None = None

    @property
    def span(self) -> tuple[int, int]:
        return self.logits if self.logits is not None else (0, int(self.input_ids.shape[1]))

    @property
    def reads(self) -> int:
        """How many positions' logits the pass returns."""
        lo, hi = self.span
        return hi - lo if self.picks is None else int(self.picks.numel())


@dataclass
class Fetch:
    """Device tensors a strategy needs on the host; it receives their host copies."""

    tensors: tuple[Tensor, ...]


@dataclass
class Settings:
    """A sequence's resolved decoding parameters (request fields over server defaults)."""

    gen_length: int
    steps: int
    block_length: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    remasking: str = "low_confidence"
    threshold: float | None = None
    factor: float = 1.0  # Fast-dLLM's
    cache: str = "none"
    cfg_scale: float = 0.0
    alg: str = "entropy"
    alg_temp: float | None = None
    apd_mixture_weight: float = 0.7
    apd_kv_window: int | None = None
    apd_max_lookahead: int | None = None
    max_parallel: int | None = None
    editing_threshold: float = 0.9
    max_post_steps: int = 16
    num_to_transfer: int = 1
    models: frozenset[str] = frozenset({"main"})  # the roles Forward.model may name here


@dataclass
class Context:
    """What a strategy may read and write for one sequence (one choice)."""

    prompt: Tensor  # [P] long, on the host
    settings: Settings
    mask_id: int
    generator: torch.Generator  # on the model device: noise is drawn where the logits are
    eos_ids: frozenset[int] = frozenset()  # the tokenizer's end tokens, for rules that stop
    canvas: Tensor = field(init=False)  # [gen_length] long, on the host: the answer

    def __post_init__(self) -> None:
        self.canvas = torch.full((self.settings.gen_length,), self.mask_id, dtype=torch.long)

    @property
    def device(self) -> torch.device:
        """Where the model's outputs (and the generator's draws) are."""
        return self.generator.device


Step = Forward | Fetch
Steps = Generator[Step, Any, None]


def call(forward: Forward) -> Generator[Step, Any, ModelOutput]:
    """``out = yield from call(forward)``: one model call."""
    out: ModelOutput = yield forward
    return out


def fetch(*tensors: Tensor) -> Generator[Step, Any, tuple[Tensor, ...]]:
    """``a, b = yield from fetch(a, b)``: host copies of device tensors."""
    host: tuple[Tensor, ...] = yield Fetch(tensors)
    return host


def masks_in(ctx: Context, start: int, end: int) -> Tensor:
    """The masked canvas positions in [start, end), counted from ``start`` (on the host)."""
    return (ctx.canvas[start:end] == ctx.mask_id).nonzero()[:, 0]


def on_device(host: Tensor, ctx: Context) -> Tensor:
    """Positions (a host index tensor) where the logits are, for ``index_select``."""
    return host.to(ctx.device, non_blocking=True)


class Strategy(abc.ABC):
    """A decoding algorithm over one sequence's canvas."""

    name: ClassVar[Decoding]
    kinds: ClassVar[tuple[str, ...]]  # model kinds it decodes
    # Request fields this strategy reads beyond the universal ones; any other field a request
    # sets is refused, so nothing is silently ignored.
    fields: ClassVar[frozenset[str]] = frozenset()

    # Canvas positions before this one are final: later passes will not change them (None:
    # every committed token is final). A rule that edits committed tokens moves it.
    settled: int | None = None

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    @classmethod
    def default_steps(cls, gen_length: int, block_length: int) -> int:
        """Denoising steps when neither the request nor the server sets any."""
        return gen_length

    @classmethod
    def block_length(cls, requested: int, gen_length: int) -> int:
        """The block length a sequence runs with: blocks of the canvas, at most all of it."""
        return min(requested, gen_length)

    @classmethod
    def positions(cls, prompt: int, s: Settings) -> int:
        """How many positions of the model's context the sequence occupies."""
        return prompt + s.gen_length

    def cached_models(self) -> frozenset[str]:
        """The models (Forward.model roles) this sequence needs a cache slot of."""
        return frozenset()

    @classmethod
    def refuse_unused(cls, params: SamplingParams, kind: str) -> None:
        """Refuse request fields that would not reach this strategy."""
        neutral = SamplingParams()
        for name in params.__struct_fields__:
            if name in UNIVERSAL or name in cls.fields:
                continue
            if getattr(params, name) != getattr(neutral, name):
                raise ParamError(
                    name, f"'{name}' does not apply to decoding '{cls.name}' on {kind} models"
                )

    @classmethod
    def check(cls, s: Settings) -> None:
        """Refuse settings this strategy cannot run; raise ParamError naming the field."""
        return None

    @abc.abstractmethod
    def run(self) -> Steps:
        """Denoise ``ctx.canvas`` in place, yielding each model call."""


def full_sequence(
    prompt: Tensor,
    canvas: Tensor,
    logits: tuple[int, int] | None = None,
    cached: Cached | None = None,
    picks: Tensor | None = None,
) -> Forward:
    """A pass over prompt + canvas, positions from 0."""
    ids = torch.cat([prompt, canvas]).unsqueeze(0)
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    return Forward(input_ids=ids, position_ids=pos, logits=logits, cached=cached, picks=picks)


def cached_span(
    prompt: Tensor,
    canvas: Tensor,
    start: int,
    stop: int,
    logits: tuple[int, int],
    picks: Tensor | None = None,
) -> Forward:
    """A cached pass over canvas[start:stop] (at its positions after the prompt): it rewrites
    that span in its sequence's slot and attends to the whole prompt + canvas there."""
    P = prompt.numel()
    ids = canvas[start:stop].unsqueeze(0)
    pos = torch.arange(P + start, P + stop).unsqueeze(0)
    return Forward(
        input_ids=ids,
        position_ids=pos,
        logits=logits,
        cached=Cached(write=P + start, keys=P + canvas.numel()),
        picks=picks,
    )


def check_filters(s: Settings) -> None:
    if not 0.0 < s.top_p <= 1.0:
        raise ParamError("top_p", "top_p must be within (0, 1]")


def top_filtered(logits: Tensor, top_p: float, top_k: int | None) -> Tensor:
    """Logits outside the top_k, or outside the smallest set whose probability reaches
    top_p, set to -inf (vLLM's order: top-k, then top-p)."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        probs, order = torch.sort(torch.softmax(logits.float(), dim=-1), descending=True)
        drop = probs.cumsum(dim=-1) - probs > top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), -torch.inf)
    return logits


def gumbel_argmax(
    logits: Tensor,
    temperature: float,
    gen: torch.Generator,
    top_p: float = 1.0,
    top_k: int | None = None,
    among: Among | None = None,
) -> Tensor:
    """The noisy argmax of LLaDA, Fast-dLLM and APD: exp(l) / (-log u)^T in float64, over
    the logits that top_p / top_k leave.

    Plain argmax at T = 0 (the most likely token survives any filter)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    l64 = top_filtered(logits, top_p, top_k).to(torch.float64)
    u = draw(among, l64.shape, gen, torch.float64)
    return (l64.exp() / (-torch.log(u)) ** temperature).argmax(dim=-1)


@dataclass(frozen=True)
class Among:
    """Rows ``rows`` (host positions) of a span of ``of`` positions: what a strategy whose
    pass read only some positions (``Forward.picks``) draws its noise for."""

    rows: Tensor
    of: int


def draw(
    among: Among | None, shape: torch.Size, gen: torch.Generator, dtype: torch.dtype
) -> Tensor:
    """Uniform noise of ``shape``; with ``among``, drawn for the whole span and these rows
    taken, so the draws are those of a pass that read every position of the span."""
    device = gen.device
    if among is None:
        return torch.rand(shape, generator=gen, dtype=dtype, device=device)
    full = torch.rand((among.of, *shape[1:]), generator=gen, dtype=dtype, device=device)
    return full.index_select(0, among.rows.to(device, non_blocking=True))


def blocks(gen_length: int, block_length: int) -> list[tuple[int, int]]:
    """Semi-autoregressive blocks [start, end) of the canvas; the last may be shorter."""
    return [(s, min(s + block_length, gen_length)) for s in range(0, gen_length, block_length)]


def steps_per_block(steps: int, n_blocks: int) -> int:
    # The references require steps divisible by the block count; round up otherwise.
    return max(1, -(-steps // n_blocks))


def transfer_schedule(n_masked: int, steps: int) -> list[int]:
    """How many tokens to unmask at each step of a block: even split, remainder first."""
    base, rem = divmod(n_masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]

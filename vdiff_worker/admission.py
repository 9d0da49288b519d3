"""Admission: a job's settings (request over server defaults), prompt ids and sequences."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import torch

from vdiff_common.protocol import Generate, SamplingParams
from vdiff_worker.decoding import strategy_for
from vdiff_worker.decoding.base import Context, ParamError, Settings, Strategy
from vdiff_worker.models.loader import LoadedModel
from vdiff_worker.sequence import Sequence

# Fast by default: what a request that names no decoding gets, per model kind, unless the
# server was started with --decoding. (decoding, cache)
FAST = {"llada": ("threshold", "dual"), "dream": ("threshold", "dual")}
# The cache a request that names none gets, whatever its decoding: LLaDA2's block cache is
# exact, so it is on even for the reference sampler.
CACHE = {"llada2": "prefix"}
# Settings that carry a request field under another name.
RENAMED = {"max_tokens": "gen_length", "diffusion_steps": "steps"}
# The confidence threshold a request that sets none gets, unless the server sets one:
# Fast-dLLM's 0.9; LLaDA2's authors and SGLang serve it at 0.95.
THRESHOLD = {"llada2": 0.95}


def reference_only(p: SamplingParams, kind: str) -> str | None:
    """A field only the reference sampler reads, if the request sets one: such a request
    means the reference sampler, not a refusal from the fast one."""
    if p.diffusion_steps is not None:
        return "diffusion_steps"
    if p.cfg_scale > 0.0:
        return "cfg_scale"
    if p.remasking == "random":
        return "remasking"
    if kind == "dream" and (p.alg is not None or p.alg_temp is not None):
        return "alg"
    return None


class Defaults:
    """Server-wide defaults for the request fields a request leaves unset: a SamplingParams of
    their own, so each has the field's name, type and bounds (a bad one is refused at start,
    naming it), plus the server-only ``max_parallel``. Only fields that are None when unset can
    have one (``top_p``, ``stop`` and the like always carry a value); ``seed`` has none, or
    every request would draw the same noise."""

    BASE: dict[str, Any] = {"max_tokens": 128, "block_length": 32}
    FIELDS = frozenset(
        f.name
        for f in msgspec.structs.fields(SamplingParams)
        if f.default is None and f.name != "seed"
    )

    def __init__(self, max_parallel: int | None = None, **fields: Any) -> None:
        unknown = sorted(set(fields) - self.FIELDS)
        if unknown:
            have = ", ".join(sorted(self.FIELDS))
            raise ValueError(f"{unknown[0]!r} has no server default; those that do: {have}")
        try:
            self.params = msgspec.convert({**self.BASE, **fields}, SamplingParams)
        except msgspec.ValidationError as err:
            raise ValueError(f"server default: {err}") from None
        self.max_parallel = max_parallel


class Admission:
    def __init__(
        self,
        loaded: LoadedModel,
        defaults: Defaults,
        models: frozenset[str],
        request_timeout: float | None = None,
    ) -> None:
        self.loaded = loaded
        self.defaults = defaults
        self.models = models
        self.request_timeout = request_timeout

    def decoding(self, p: SamplingParams) -> tuple[str, str]:
        """(decoding, cache) the request runs with."""
        d, kind = self.defaults.params, self.loaded.kind
        cache = p.cache or d.cache or CACHE.get(kind, "none")
        if p.decoding is not None or d.decoding is not None:
            return p.decoding or d.decoding or "reference", cache
        if kind in FAST and reference_only(p, kind) is None:
            decoding, fast_cache = FAST[kind]
            return decoding, p.cache or d.cache or fast_cache
        return "reference", cache

    def settings(self, p: SamplingParams, cls: type[Strategy], cache: str) -> Settings:
        """Each setting is its request field, else the server's default of that name, else
        what depends on the strategy or the model kind, else Settings' own default."""
        d, fields = self.defaults.params, Settings.__dataclass_fields__
        resolved: dict[str, Any] = {}
        for name in SamplingParams.__struct_fields__:
            setting = RENAMED.get(name, name)
            if setting in fields:
                value = getattr(p, name)
                value = getattr(d, name) if value is None else value
                if value is not None:
                    resolved[setting] = value
        gen = resolved["gen_length"]
        block = resolved["block_length"] = cls.block_length(resolved["block_length"], gen)
        resolved.setdefault("steps", cls.default_steps(gen, block))
        resolved.setdefault("threshold", THRESHOLD.get(self.loaded.kind, 0.9))
        resolved["cache"] = cache  # resolved with the decoding (see decoding())
        return Settings(**resolved, max_parallel=self.defaults.max_parallel, models=self.models)

    def prompt_ids(self, job: Generate) -> list[int]:
        tok = self.loaded.tokenizer
        if job.messages is not None:
            return tok.apply_chat_template(job.messages)
        if job.prompt is not None:
            return tok.encode(job.prompt)
        ids = list(job.prompt_ids or [])
        bad = [t for t in ids if not 0 <= t < tok.vocab_size]
        if bad:
            raise ParamError(
                "prompt", f"token id {bad[0]} is outside the vocabulary (size {tok.vocab_size})"
            )
        return ids

    def sequences(self, job: Generate, arrived: float) -> list[Sequence]:
        """The job's choices, or ParamError (a 400 naming the field)."""
        decoding, cache = self.decoding(job.params)
        cls = strategy_for(self.loaded.kind, decoding)
        cls.refuse_unused(job.params, self.loaded.kind)
        settings = self.settings(job.params, cls, cache)
        if settings.steps > settings.gen_length:
            raise ParamError(
                "diffusion_steps",
                f"diffusion_steps ({settings.steps}) must not "
                f"exceed max_tokens ({settings.gen_length}): a "
                "step commits at least one token",
            )
        cls.check(settings)
        ids = self.prompt_ids(job)
        limit = self.loaded.max_model_len
        if cls.positions(len(ids), settings) > limit:
            blocks = (
                ""
                if cls.positions(len(ids), settings) == len(ids) + settings.gen_length
                else f", in whole blocks of {settings.block_length},"
            )
            raise ParamError(
                "max_tokens",
                f"prompt ({len(ids)} tokens) plus max_tokens "
                f"({settings.gen_length}){blocks} exceeds the model's "
                f"maximum context length of {limit} tokens",
            )
        device = self.loaded.device
        prompt = torch.tensor(ids, dtype=torch.long)  # on the host, as the canvas
        stop_ids = self.loaded.tokenizer.stop_token_ids | frozenset(job.params.stop_token_ids)
        deadline = time.monotonic() + self.request_timeout if self.request_timeout else None
        mask_id = self.loaded.mask_token_id if self.loaded.mask_token_id is not None else -1
        out = []
        for i in range(job.n):
            gen = torch.Generator(device=device)
            seed = job.params.seed
            gen.manual_seed(seed + i if seed is not None else int(torch.randint(2**62, ())))
            ctx = Context(
                prompt=prompt,
                settings=settings,
                mask_id=mask_id,
                generator=gen,
                eos_ids=self.loaded.tokenizer.eos_token_ids,
            )
            out.append(
                Sequence(
                    request_id=job.request_id,
                    index=i,
                    ctx=ctx,
                    strategy=cls(ctx),
                    tokenizer=self.loaded.tokenizer,
                    stop_ids=stop_ids,
                    stop_strings=list(job.params.stop),
                    early_stop=job.params.eos_early_stop,
                    stream=job.stream,
                    deadline=deadline,
                    arrived=arrived,
                )
            )
        return out

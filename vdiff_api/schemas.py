"""OpenAI request schemas as msgspec Structs; unknown fields are refused, never ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from vdiff_common.protocol import Decoding

NonNeg = Annotated[float, msgspec.Meta(ge=0.0)]
Prob = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
# Upper bounds keep every integer inside what the wire format and a tensor index can hold.
PosInt = Annotated[int, msgspec.Meta(ge=1, le=1 << 20)]
TokenId = Annotated[int, msgspec.Meta(ge=0, lt=1 << 31)]
Seed = Annotated[int, msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)]


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class _Sampling(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Fields shared by completions and chat: OpenAI's, then vLLM/diffusion extras."""

    model: str | None = None
    max_tokens: PosInt | None = None
    max_completion_tokens: PosInt | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=-1, lt=1 << 31)] | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted only at their neutral value: diffusion sampling has no token penalties.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    # Diffusion fields (vLLM-style extra body).
    decoding: Decoding | None = None
    diffusion_steps: PosInt | None = None
    block_length: PosInt | None = None
    remasking: Literal["low_confidence", "random"] | None = None
    threshold: Prob | None = None
    factor: Annotated[float, msgspec.Meta(gt=0.0)] | None = None
    cache: Literal["none", "prefix", "dual"] | None = None
    cfg_scale: NonNeg = 0.0
    alg: Literal["origin", "maskgit_plus", "topk_margin", "entropy"] | None = None
    alg_temp: NonNeg | None = None
    apd_mixture_weight: Prob | None = None
    apd_kv_window: PosInt | None = None
    apd_max_lookahead: PosInt | None = None
    eos_early_stop: bool = True
    return_token_ids: bool = False


class CompletionRequest(_Sampling, forbid_unknown_fields=True, kw_only=True):
    prompt: str | list[Any]  # text, token ids, or a batch of either; checked in plan()
    echo: bool = False
    best_of: Annotated[int, msgspec.Meta(ge=1, le=16)] | None = None
    suffix: str | None = None


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling, forbid_unknown_fields=True, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True


class TokenizeRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """vLLM's POST /tokenize: `prompt` text or chat `messages` (with the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)] | None = None


class DetokenizeRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """vLLM's POST /detokenize: the text of token ids."""

    model: str | None = None
    tokens: list[TokenId]

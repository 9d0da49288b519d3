"""OpenAI request schemas as msgspec Structs; unknown fields are refused, never ignored.

The sampling fields that reach the worker are the protocol's ``SamplingParams``, inherited
with their bounds; only what HTTP spells differently (``stop`` as one string or a list) and
the OpenAI fields the gateway handles itself are declared here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from vdiff_common.protocol import PosInt, SamplingParams, TokenId


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class _Sampling(SamplingParams, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Fields shared by completions and chat: SamplingParams', then what the gateway reads."""

    model: str | None = None
    max_completion_tokens: PosInt | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1
    stop: str | list[str] | None = None  # type: ignore[assignment]
    stop_token_ids: list[TokenId] | None = None  # type: ignore[assignment]
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
    return_token_ids: bool = False


class CompletionRequest(_Sampling, frozen=True, forbid_unknown_fields=True, kw_only=True):
    prompt: str | list[Any]  # text, token ids, or a batch of either; checked in plan()
    echo: bool = False
    best_of: Annotated[int, msgspec.Meta(ge=1, le=16)] | None = None
    suffix: str | None = None


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling, frozen=True, forbid_unknown_fields=True, kw_only=True):
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


# ---- responses (completions and chat; UNSET fields are left out of the JSON) ----------------


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    forward_passes: int  # model passes, APD's verifier's included (vdiff's own field)


class AssistantMessage(msgspec.Struct):
    content: str
    role: str = "assistant"


class _Choice(msgspec.Struct):
    index: int
    finish_reason: str | None
    logprobs: None = None
    text: str | msgspec.UnsetType = msgspec.UNSET  # completions; chat has message or delta
    token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET


class Choice(_Choice):
    """One whole choice: ``text`` for completions, ``message`` for chat."""

    message: AssistantMessage | msgspec.UnsetType = msgspec.UNSET


class Delta(msgspec.Struct):
    role: str | msgspec.UnsetType = msgspec.UNSET
    content: str | msgspec.UnsetType = msgspec.UNSET


class StreamChoice(_Choice):
    """One streamed choice: new ``text`` (completions) or a ``delta`` (chat)."""

    delta: Delta | msgspec.UnsetType = msgspec.UNSET


class Completion(msgspec.Struct):
    """A whole response (``object``: "text_completion" or "chat.completion")."""

    id: str
    object: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class CompletionChunk(msgspec.Struct):
    """One streamed event; the last, with include_usage, has no choices and the usage."""

    id: str
    object: str
    created: int
    model: str
    choices: list[StreamChoice]
    usage: Usage | msgspec.UnsetType = msgspec.UNSET

"""Turns a validated OpenAI request into worker jobs; refuses what cannot apply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vdiff_api.errors import APIError
from vdiff_api.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, _Sampling
from vdiff_common.protocol import Generate, ModelInfo, SamplingParams


@dataclass
class Plan:
    """The jobs of one HTTP request: one Generate per prompt, `n` choices each."""

    model: str
    jobs: list[Generate]
    n: int
    stream: bool
    include_usage: bool
    return_token_ids: bool


def _refuse_unsupported(req: _Sampling) -> None:
    neutral: list[tuple[str, bool]] = [
        ("presence_penalty", req.presence_penalty == 0.0),
        ("frequency_penalty", req.frequency_penalty == 0.0),
        ("repetition_penalty", req.repetition_penalty == 1.0),
        ("logit_bias", not req.logit_bias),
        ("logprobs", req.logprobs in (None, False)),
        ("top_logprobs", req.top_logprobs in (None, 0)),
    ]
    if isinstance(req, CompletionRequest):
        neutral += [
            ("echo", not req.echo),
            ("suffix", req.suffix is None),
            ("best_of", req.best_of in (None, req.n)),
        ]
    if isinstance(req, ChatCompletionRequest):
        neutral += [
            ("tools", not req.tools),
            ("tool_choice", req.tool_choice in (None, "none")),
            ("response_format", req.response_format in (None, {"type": "text"})),
            ("add_generation_prompt", req.add_generation_prompt),
        ]
    for name, ok in neutral:
        if not ok:
            raise APIError(
                400, f"'{name}' is not supported by diffusion models on this server", param=name
            )


def _params(req: _Sampling, info: ModelInfo) -> SamplingParams:
    max_tokens = req.max_completion_tokens or req.max_tokens
    field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    if max_tokens is not None and max_tokens > info.max_model_len:
        raise APIError(
            400,
            f"'{field}' is {max_tokens}, more than this model's maximum "
            f"context length of {info.max_model_len} tokens",
            param=field,
        )
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop):
        raise APIError(400, "stop strings must not be empty", param="stop")
    # The schema inherits SamplingParams' fields: each goes over by name, these three as
    # the wire spells them.
    spelled = {
        "max_tokens": max_tokens,
        "stop": stop,
        "stop_token_ids": list(req.stop_token_ids or []),
    }
    return SamplingParams(
        **{f: spelled.get(f, getattr(req, f)) for f in SamplingParams.__struct_fields__}
    )


def messages(chat: list[ChatMessage]) -> list[dict[str, str]]:
    """Chat messages as the worker's chat template takes them; only text content."""
    out = []
    for i, m in enumerate(chat):
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(
                        400, "only text content parts are supported", param=f"messages[{i}].content"
                    )
                parts.append(part["text"])
            content = "".join(parts)
        out.append(
            {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        )
    return out


def _is_ids(x: object) -> bool:
    return isinstance(x, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1 << 31 for t in x
    )


def _prompts(p: str | list[Any]) -> list[str | list[int]]:
    """A prompt is text, token ids, or a non-empty batch of either."""
    prompts: list[str | list[int]]
    if isinstance(p, str) or (p and _is_ids(p)):
        prompts = [p]
    elif p and all(isinstance(x, str) or _is_ids(x) for x in p):
        prompts = list(p)
    else:
        raise APIError(
            400, "prompt must be a string, a list of token ids, or a list of either", param="prompt"
        )
    if any(len(x) == 0 for x in prompts):
        raise APIError(400, "prompt must not be empty", param="prompt")
    return prompts


def plan(req: CompletionRequest | ChatCompletionRequest, request_id: str, info: ModelInfo) -> Plan:
    _refuse_unsupported(req)
    params = _params(req, info)
    jobs: list[Generate] = []
    if isinstance(req, ChatCompletionRequest):
        jobs.append(
            Generate(
                request_id=request_id,
                model=info.name,
                messages=messages(req.messages),
                params=params,
                n=req.n,
                stream=req.stream,
            )
        )
    else:
        prompts = _prompts(req.prompt)
        for k, prompt in enumerate(prompts):
            rid = request_id if len(prompts) == 1 else f"{request_id}-{k}"
            if isinstance(prompt, str):
                jobs.append(
                    Generate(
                        request_id=rid,
                        model=info.name,
                        prompt=prompt,
                        params=params,
                        n=req.n,
                        stream=req.stream,
                    )
                )
            else:
                jobs.append(
                    Generate(
                        request_id=rid,
                        model=info.name,
                        prompt_ids=list(prompt),
                        params=params,
                        n=req.n,
                        stream=req.stream,
                    )
                )
    opts = req.stream_options
    if opts is not None and not req.stream:
        raise APIError(
            400, "'stream_options' is only allowed when 'stream' is true", param="stream_options"
        )
    return Plan(
        model=info.name,
        jobs=jobs,
        n=req.n,
        stream=req.stream,
        include_usage=bool(opts and opts.include_usage),
        return_token_ids=req.return_token_ids,
    )

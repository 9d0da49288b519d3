"""The official OpenAI SDK against a real all-in-one server (gateway + worker process)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.conftest import Server


@pytest.fixture()
def client(llada_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=llada_server.url, api_key="unused", max_retries=0)


def test_models_list_shows_served_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["llada-tiny"]
    assert models[0].model_extra["max_model_len"] == 512


def test_models_retrieve_gives_the_listed_model(client: openai.OpenAI) -> None:
    model = client.models.retrieve("llada-tiny")
    assert model == client.models.list().data[0]
    assert model.id == "llada-tiny" and model.object == "model"
    assert model.model_extra["max_model_len"] == 512


def test_models_retrieve_unknown_is_openai_404(client: openai.OpenAI, llada_server: Server) -> None:
    for name in ("nope", "org/nope"):  # the SDK sends the slash as %2F
        with pytest.raises(openai.NotFoundError) as err:
            client.models.retrieve(name)
        assert err.value.body == {
            "message": f"The model '{name}' does not exist.",
            "type": "not_found_error",
            "param": "model",
            "code": 404,
        }
    raw = httpx.get(llada_server.url + "/models/nope")
    assert raw.status_code == 404 and set(raw.json()) == {"error"}


def test_completion(client: openai.OpenAI) -> None:
    out = client.completions.create(model="llada-tiny", prompt="What is 2 + 3?", max_tokens=16)
    choice = out.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > 0
    assert out.usage.completion_tokens > 0
    assert out.usage.model_extra["forward_passes"] > 0


def test_chat_completion(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="llada-tiny", messages=[{"role": "user", "content": "What is 24 + 1?"}], max_tokens=32
    )
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == "11"  # golden: the tiny model's answer
    assert out.choices[0].finish_reason == "stop"


def test_chat_stream_matches_non_stream(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Sort the numbers: 6 3 57"}]
    full = client.chat.completions.create(
        model="llada-tiny", messages=messages, max_tokens=32, extra_body={"block_length": 8}
    )
    stream = client.chat.completions.create(
        model="llada-tiny",
        messages=messages,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"block_length": 8},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])


def test_completion_stream_raw_sse(llada_server: Server) -> None:
    body = {
        "model": "llada-tiny",
        "prompt": "What is 2 + 3?",
        "max_tokens": 16,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", llada_server.url + "/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"]
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e and not e.startswith(":")]  # keep-alives
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert '"usage"' in events[-2]


def test_bad_input_gets_openai_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="llada-tiny", prompt="hi", max_tokens="many")  # type: ignore[arg-type]
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="llada-tiny", prompt="hi", extra_body={"bogus": 1})
    assert err.value.body["param"] == "bogus"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="llada-tiny", prompt="hi", presence_penalty=0.5)
    assert err.value.body["param"] == "presence_penalty"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    for extra, field in (
        ({"prompt": [1, 2**40]}, "prompt"),
        ({"seed": 2**70}, "seed"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"max_tokens": 8, "diffusion_steps": 2**30}, "diffusion_steps"),
        ({"max_tokens": 8, "diffusion_steps": 9}, "diffusion_steps"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(
                model="llada-tiny", prompt=extra.pop("prompt", "hi"), extra_body=extra
            )
        assert err.value.body["param"].startswith(field), err.value.body
    # The worker survived all of it.
    assert client.completions.create(model="llada-tiny", prompt="hi", max_tokens=8).choices


def test_health_and_metrics(llada_server: Server) -> None:
    assert httpx.get(llada_server.base + "/health/live").status_code == 200
    assert httpx.get(llada_server.base + "/health/ready").status_code == 200
    detail = httpx.get(llada_server.base + "/health").json()
    assert detail["workers"][0]["models"] == ["llada-tiny"]
    text = httpx.get(llada_server.base + "/metrics").text
    assert "vdiff_request_success_total" in text


def test_server_timing_splits_gateway_transport_worker(llada_server: Server) -> None:
    body = {"model": "llada-tiny", "prompt": "What is 2 + 3?", "max_tokens": 8}
    start = time.perf_counter()
    r = httpx.post(llada_server.url + "/completions", json=body, timeout=60)
    latency_ms = (time.perf_counter() - start) * 1000
    parts = dict(p.strip().split(";dur=") for p in r.headers["server-timing"].split(","))
    ms = {k: float(v) for k, v in parts.items()}
    assert set(ms) == {"gateway", "transport", "worker"}
    # Each share is real time (a socket round trip and a forward pass are never free), and
    # together they fit in what the client saw.
    assert all(v > 0 for v in ms.values()), ms
    assert sum(ms.values()) <= latency_ms
    text = httpx.get(llada_server.base + "/metrics").text
    assert "vdiff_transport_overhead_seconds_count" in text

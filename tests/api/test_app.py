"""The gateway's routes in-process, over a fake Backend: auth, the 404/503/429 answers in
OpenAI's error shape, health from the snapshot, JSON and SSE bodies."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Protocol

import pytest
from starlette.testclient import TestClient

from tests.api.fake import FakeBackend
from vdiff_api.app import Gateway, Settings
from vdiff_api.auth import APIKeys
from vdiff_api.backend import NoWorker, Result
from vdiff_api.frontdoor import Policy
from vdiff_common.protocol import Error, Generate

KEY = "sekret-key"


def _client(backend: FakeBackend, expected: list[str] | None = None) -> Iterator[TestClient]:
    gateway = Gateway(backend, Settings(expected_models=expected or []))
    with TestClient(gateway.app) as client:
        yield client


@pytest.fixture()
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture()
def client(backend: FakeBackend) -> Iterator[TestClient]:
    yield from _client(backend)


class _Reply(Protocol):
    """A TestClient response (httpx2's, or httpx's where only that is installed)."""

    @property
    def status_code(self) -> int: ...

    @property
    def text(self) -> str: ...

    def json(self) -> Any: ...


def _error(r: _Reply, status: int, param: str | None) -> str:
    """The message of an OpenAI-shaped error body, after checking its shape."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == status and body["error"]["param"] == param
    message: str = body["error"]["message"]
    return message


def test_lifespan_starts_and_stops_the_backend(backend: FakeBackend) -> None:
    clients = _client(backend)
    next(clients)
    assert backend.started
    with pytest.raises(StopIteration):
        next(clients)
    assert not backend.started


def test_health_ready_and_stats_read_the_snapshot(client: TestClient) -> None:
    assert client.get("/health/live").json() == {"status": "alive"}
    assert client.get("/health/ready").json() == {"ready": True}
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["active_requests"] == 0
    assert health["workers"] == [
        {
            "id": "w0",
            "models": ["tiny"],
            "draining": False,
            "running": 1,
            "waiting": 2,
            "inflight": 0,
        }
    ]
    stats = client.get("/v1/engine/stats").json()["workers"][0]
    assert stats["capacity"] == 4 and stats["batch_size"] == {"mean": 0.0, "max": 0}


def test_not_ready_without_an_expected_model(backend: FakeBackend) -> None:
    for client in _client(backend, expected=["tiny", "other"]):
        assert client.get("/health/ready").status_code == 503
        assert client.get("/health").json()["status"] == "unavailable"
    backend.models = []
    for client in _client(backend):
        assert client.get("/health/ready").json() == {"ready": False}


def test_models_list_and_retrieve(client: TestClient) -> None:
    card = {
        "id": "tiny",
        "object": "model",
        "created": 0,
        "owned_by": "vdiff",
        "root": "tiny",
        "max_model_len": 64,
    }
    assert client.get("/v1/models").json() == {"object": "list", "data": [card]}
    assert client.get("/v1/models/tiny").json() == card
    message = _error(client.get("/v1/models/org%2Fnope"), 404, "model")
    assert message == "The model 'org/nope' does not exist."
    assert client.get("/v1/models/nope").json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("status", [400, 404, 503])
@pytest.mark.parametrize(
    "path", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/v1/models/tiny"]
)
def test_resolve_refusals_answer_in_openai_shape(
    backend: FakeBackend, client: TestClient, path: str, status: int
) -> None:
    backend.refusal = NoWorker(status, "refused for the test")
    body = {"model": "tiny", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}
    body.pop("prompt" if "chat" in path else "messages")
    r = client.get(path) if path.startswith("/v1/models") else client.post(path, json=body)
    assert _error(r, status, "model") == "refused for the test"
    assert ("retry-after" in r.headers) == (status == 503)
    assert not backend.jobs


def test_completion_is_collected_and_its_job_released(
    backend: FakeBackend, client: TestClient
) -> None:
    r = client.post(
        "/v1/completions",
        json={"model": "tiny", "prompt": "hi", "n": 2, "max_tokens": 8, "return_token_ids": True},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "cmpl-" + r.headers["x-request-id"]
    assert [(c["text"], c["token_ids"], c["finish_reason"]) for c in body["choices"]] == [
        ("<0>", [100], "stop"),
        ("<1>", [101], "stop"),
    ]
    assert body["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "forward_passes": 4,
    }
    [job] = backend.jobs
    assert not job.stream and job.n == 2 and job.params.max_tokens == 8
    assert backend.aborted == [job.request_id]  # abort() is how a finished job is let go
    assert r.headers["server-timing"].startswith("gateway;dur=")


def test_chat_stream_is_framed_as_sse(backend: FakeBackend, client: TestClient) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "developer", "content": "be brief"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert backend.jobs[0].messages == [{"role": "system", "content": "be brief"}]
    events = [e for e in raw.split("\n\n") if e and not e.startswith(":")]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert [c["choices"][0]["delta"] for c in chunks[:-1]] == [
        {"role": "assistant", "content": ""},
        {"content": "<0>"},
        {},
    ]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 1


def test_worker_error_and_full_backend_are_openai_errors(
    backend: FakeBackend, client: TestClient
) -> None:
    def too_long(msg: Generate) -> list[Result]:
        return [Error(msg.request_id, 400, "the prompt is too long", "prompt")]

    backend.answer = too_long
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
    assert _error(r, 400, "prompt") == "the prompt is too long"
    backend.full = NoWorker(429, "every worker is at capacity")
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
    assert _error(r, 429, None) == "every worker is at capacity"
    assert r.headers["retry-after"] == "1"


def test_bad_bodies_name_the_field(client: TestClient) -> None:
    r = client.post("/v1/completions", content=b"{not json")
    assert _error(r, 400, None).startswith("request body is not valid JSON")
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "bogus": 1})
    assert _error(r, 400, "bogus").startswith("unsupported field 'bogus'")
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 65})
    assert "maximum context length of 64" in _error(r, 400, "max_tokens")
    r = client.post("/tokenize", json={"model": "tiny"})
    assert _error(r, 400, "prompt") == "give exactly one of 'prompt' and 'messages'"


def test_tokenize_and_detokenize_go_through_call(backend: FakeBackend, client: TestClient) -> None:
    assert client.post("/tokenize", json={"prompt": "hi"}).json() == {
        "count": 3,
        "max_model_len": 64,
        "tokens": [1, 2, 3],
    }
    assert client.post("/detokenize", json={"model": "tiny", "tokens": [7, 8]}).json() == {
        "prompt": "7 8"
    }
    assert [c.model for c in backend.calls] == ["tiny", "tiny"]


def test_api_keys_guard_the_openai_routes(backend: FakeBackend) -> None:
    gateway = Gateway(backend, Settings(), Policy(keys=APIKeys([KEY])))
    with TestClient(gateway.app) as client:
        r = client.get("/v1/models/tiny")
        assert _error(r, 401, None).startswith("missing API key")
        assert r.headers["www-authenticate"] == "Bearer"
        r = client.get("/v1/models", headers={"authorization": "Bearer wrong"})
        assert _error(r, 401, None) == "invalid API key"
        r = client.get("/v1/models/tiny", headers={"authorization": f"Bearer {KEY}"})
        assert r.json()["id"] == "tiny"
        assert client.get("/health/ready").status_code == 200  # probes need no key


def test_draining_refuses_new_work(backend: FakeBackend) -> None:
    gateway = Gateway(backend, Settings())
    with TestClient(gateway.app) as client:
        gateway.draining = True
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
        assert _error(r, 503, None) == "server is shutting down"
        assert r.headers["connection"] == "close"
        assert client.get("/health/ready").status_code == 503
    assert not backend.jobs


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/nothing-here", 404),
        ("GET", "/v1/models/bad%0Aname", 404),  # a name no route's pattern takes
        ("GET", "/v1/completions", 405),
    ],
)
def test_starlettes_own_answers_are_openai_shaped(
    client: TestClient, method: str, path: str, status: int
) -> None:
    r = client.request(method, path)
    assert r.headers["content-type"] == "application/json"
    assert _error(r, status, None)

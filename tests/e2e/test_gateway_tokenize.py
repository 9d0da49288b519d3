"""POST /tokenize and /detokenize (vLLM's shapes), answered by a worker's tokenizer."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Server
from tests.e2e.conftest import FILE_KEYS

KEY = {"Authorization": f"Bearer {FILE_KEYS[2]}"}
CHAT = [{"role": "user", "content": "What is 24 + 1?"}]


def _post(server: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.base + path, json=body, headers=KEY, timeout=30)


def test_tokenize_counts_what_generation_counts(secured: Server) -> None:
    prompt = "What is 2 + 3?"
    tok = _post(secured, "/tokenize", {"model": "llada-tiny", "prompt": prompt})
    assert tok.status_code == 200, tok.text
    body = tok.json()
    assert set(body) == {"count", "max_model_len", "tokens"}
    assert body["count"] == len(body["tokens"]) > 0 and body["max_model_len"] == 512
    gen = _post(
        secured, "/v1/completions", {"model": "llada-tiny", "prompt": prompt, "max_tokens": 4}
    )
    assert gen.json()["usage"]["prompt_tokens"] == body["count"]

    chat = _post(secured, "/tokenize", {"messages": CHAT})  # the only model by default
    assert chat.status_code == 200, chat.text
    gen = _post(
        secured, "/v1/chat/completions", {"model": "llada-tiny", "messages": CHAT, "max_tokens": 4}
    )
    assert gen.json()["usage"]["prompt_tokens"] == chat.json()["count"] > body["count"]


def test_detokenize_round_trip(secured: Server) -> None:
    ids = _post(secured, "/tokenize", {"model": "llada-tiny", "prompt": "Sort 6 3 57"}).json()
    back = _post(secured, "/detokenize", {"model": "llada-tiny", "tokens": ids["tokens"]})
    assert back.status_code == 200 and back.json()["prompt"].endswith("Sort 6 3 57")
    assert _post(secured, "/detokenize", {"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"model": "llada-tiny"}, 400, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": CHAT}, 400, "prompt"),
        ("/tokenize", {"prompt": "a", "add_special_tokens": False}, 400, "add_special_tokens"),
        (
            "/tokenize",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            400,
            "messages[0].content",
        ),
        ("/tokenize", {"model": "nope", "prompt": "a"}, 404, "model"),
        ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens[0]"),
        ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ],
)
def test_bad_requests_get_openai_errors(
    secured: Server, path: str, body: dict, status: int, param: str
) -> None:
    r = _post(secured, path, body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param

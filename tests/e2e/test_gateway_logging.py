"""One access line per request (id, model, status, latency, tokens, worker), as text or as
JSON lines that parse."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

import httpx

from tests.conftest import Server
from tests.e2e.conftest import FILE_KEYS


def _json_lines(server: Server) -> list[dict]:
    lines = [line for line in server.procs[0].output().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line, gateway's and worker's


def _eventually(find: Callable[[], list]) -> list:
    """The access line is written once the response is out, maybe after the client has it."""
    deadline = time.monotonic() + 5
    while not (found := find()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def _access(server: Server, rid: str) -> list[dict]:
    return _eventually(
        lambda: [
            r["record"]["extra"]
            for r in _json_lines(server)
            if r["record"]["extra"].get("access") and r["record"]["extra"]["request_id"] == rid
        ]
    )


def test_json_access_lines(secured: Server) -> None:
    key = {"Authorization": f"Bearer {FILE_KEYS[1]}"}
    rid = uuid.uuid4().hex
    body = {"model": "llada-tiny", "prompt": "What is 2 + 3?", "max_tokens": 8}
    r = httpx.post(
        secured.url + "/completions", json=body, timeout=60, headers={**key, "x-request-id": rid}
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == rid
    usage = r.json()["usage"]
    [line] = _access(secured, rid)
    assert line["status"] == 200 and line["model"] == "llada-tiny"
    assert line["method"] == "POST" and line["path"] == "/v1/completions"
    assert line["prompt_tokens"] == usage["prompt_tokens"] > 0
    assert line["completion_tokens"] == usage["completion_tokens"]
    assert line["worker"] == "local-0" and line["latency_s"] > 0
    assert line["principal"].startswith("key:") and FILE_KEYS[1] not in json.dumps(line)

    rid = uuid.uuid4().hex
    with httpx.stream(
        "POST",
        secured.url + "/chat/completions",
        timeout=60,
        headers={**key, "x-request-id": rid},
        json={
            "model": "llada-tiny",
            "max_tokens": 8,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        },
    ) as s:
        assert s.read().decode().rstrip().endswith("[DONE]")
    [line] = _access(secured, rid)
    assert line["status"] == 200 and line["path"] == "/v1/chat/completions"
    assert line["worker"] == "local-0" and line["prompt_tokens"] > 0

    rid = uuid.uuid4().hex
    assert httpx.get(secured.url + "/models", headers={"x-request-id": rid}).status_code == 401
    [line] = _access(secured, rid)
    assert line["status"] == 401 and line["model"] == "" and line["worker"] == ""


def test_text_access_line(llada_server: Server) -> None:
    rid = uuid.uuid4().hex
    r = httpx.post(
        llada_server.url + "/completions",
        headers={"x-request-id": rid},
        json={"model": "llada-tiny", "prompt": "hi", "max_tokens": 8},
        timeout=60,
    )
    usage = r.json()["usage"]
    [line] = _eventually(
        lambda: [x for x in llada_server.procs[0].output().splitlines() if rid in x]
    )
    assert "POST /v1/completions status=200 model=llada-tiny latency=" in line
    assert f"prompt_tokens={usage['prompt_tokens']} " in line
    assert f"completion_tokens={usage['completion_tokens']} worker=local-0 " in line

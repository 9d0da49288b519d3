"""Step-level batching through the real server: isolation, abort, backpressure, memory guard."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import GOLDEN, Server, start_allinone

SHARED = json.loads((GOLDEN / "cases" / "shared_llada.json").read_text())
CASES = [c for c in SHARED["generate"] if "prompt_ids" in c][:8]
PROMPTS = [c["prompt_ids"] for c in CASES]
# The settings of those eight golden cases (LLaDA's generate, one token a step), and their
# answers: what a request with them must give, alone or batched.
assert all(c["params"] == CASES[0]["params"] for c in CASES)
REFERENCE = {
    "decoding": "reference",
    "max_tokens": CASES[0]["params"]["gen_length"],
    "diffusion_steps": CASES[0]["params"]["steps"],
    "block_length": CASES[0]["params"]["block_length"],
    "temperature": 0.0,
}
STOP = {SHARED["eos_token_id"], 485}  # <|endoftext|>, <|eot_id|>
ANSWERS = [
    c["output_ids"][: next((i for i, t in enumerate(c["output_ids"]) if t in STOP), None)]
    for c in CASES
]


def _start(tmp: Path, *flags: str, env: dict[str, str] | None = None) -> Server:
    return start_allinone(
        tmp, "--model", str(GOLDEN / "llada-tiny"), "--heartbeat-interval", "0.2", *flags, env=env
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = _start(tmp_path_factory.mktemp("engine"), "--max-num-seqs", "8")
    yield s
    assert httpx.get(s.base + "/health").json()["active_requests"] == 0  # nothing leaked
    for p in s.procs:
        assert p.stop() == 0


def _complete(s: Server, prompt: list[int], **extra: object) -> httpx.Response:
    body = {
        "model": "llada-tiny",
        "prompt": prompt,
        "max_tokens": 32,
        "block_length": 8,
        "return_token_ids": True,
        **extra,
    }
    return httpx.post(s.url + "/completions", json=body, timeout=120)


def _tokens(r: httpx.Response) -> list[int]:
    assert r.status_code == 200, r.text
    return list(r.json()["choices"][0]["token_ids"])


def _stats(s: Server) -> dict:
    return httpx.get(s.url + "/engine/stats").json()["workers"][0]


def _active(s: Server) -> int:
    return int(httpx.get(s.base + "/health").json()["active_requests"])


def test_concurrent_requests_give_the_tokens_they_give_alone(server: Server) -> None:
    # With the golden settings, eight at once give the reference's answers.
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        assert list(pool.map(lambda p: _tokens(_complete(server, p, **REFERENCE)), PROMPTS)) == (
            ANSWERS
        )
    # With the default (threshold + dual cache), the answers each gives alone.
    alone = [_tokens(_complete(server, p)) for p in PROMPTS]
    time.sleep(0.5)  # the counters ride on heartbeats (every 0.2 s here)
    before = _stats(server)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: _tokens(_complete(server, p)), PROMPTS))
    assert together == alone
    time.sleep(0.5)
    stats = _stats(server)
    assert stats["batch_size"]["max"] > 1  # they really shared forward passes
    # Cached (dual-cache) passes share model calls too: rows per call well above one.
    calls = stats["model_calls"] - before["model_calls"]
    assert (stats["model_rows"] - before["model_rows"]) / calls > 2


def test_seeded_sampling_is_independent_of_the_batch(server: Server) -> None:
    extra = {"temperature": 0.8, "seed": 7}
    alone = _tokens(_complete(server, PROMPTS[0], **extra))
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(_complete, server, p, temperature=1.0) for p in PROMPTS[1:4]]
        mine = _tokens(_complete(server, PROMPTS[0], **extra))
        for f in others:
            f.result()
    assert mine == alone


def test_aborted_stream_frees_its_slot(server: Server) -> None:
    # 480 steps take far longer than the wait below, so only the abort can free the slot.
    body = {
        "model": "llada-tiny",
        "prompt": PROMPTS[0],
        "max_tokens": 480,
        "diffusion_steps": 480,
        "block_length": 8,
        "stream": True,
        "eos_early_stop": False,
    }
    aborted = _stats(server)["aborted"]
    with httpx.stream("POST", server.url + "/completions", json=body, timeout=60) as r:
        # Keep the line iterator referenced: a dropped one is finalised whenever the garbage
        # collector gets to it, and closing it closes the stream (a 499 mid-test).
        lines = r.iter_lines()
        next(lines)
        assert _wait(lambda: _stats(server)["running"] == 1)
    assert _wait(
        lambda: _stats(server)["running"] == 0 and _stats(server)["inflight"] == 0, timeout=2.0
    )
    assert _active(server) == 0
    # The job stopped, not just its stream: the worker counted the abort, and its model calls
    # stop (two heartbeats apart, the counters are the same).
    assert _wait(lambda: _stats(server)["aborted"] == aborted + 1)
    calls = _stats(server)["model_calls"]
    time.sleep(0.5)
    assert _stats(server)["model_calls"] == calls


def test_abandoned_request_frees_its_slot(server: Server) -> None:
    # The same, without streaming: nothing is written until the answer, so only the
    # connection closing (which the server reads) can tell the gateway the client left.
    body = json.dumps(
        {
            "model": "llada-tiny",
            "prompt": PROMPTS[0],
            "max_tokens": 480,
            "diffusion_steps": 480,
            "block_length": 8,
            "eos_early_stop": False,
        }
    ).encode()
    host, port = server.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
            b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert _wait(lambda: _stats(server)["running"] == 1)
    assert _wait(
        lambda: _stats(server)["running"] == 0 and _stats(server)["inflight"] == 0, timeout=2.0
    )
    assert _active(server) == 0


def _wait(cond: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_queue_overflow_gets_429_with_retry_after(tmp_path: Path) -> None:
    s = _start(tmp_path, "--max-num-seqs", "1", "--max-queue-size", "1")
    try:
        long = {"max_tokens": 128, "diffusion_steps": 128, "eos_early_stop": False}
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda p: _complete(s, p, **long), PROMPTS[:6]))
        codes = sorted(r.status_code for r in results)
        assert 200 in codes and 429 in codes, codes
        refused = next(r for r in results if r.status_code == 429)
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert _complete(s, PROMPTS[0]).status_code == 200  # nothing stuck afterwards
    finally:
        s.procs[0].stop()


def test_out_of_memory_splits_the_batch_and_a_too_big_request_fails_alone(tmp_path: Path) -> None:
    # Any pass over more than 2 x 60 tokens "runs out of memory": batches of 4 must split, and
    # the split batches still give the reference's answers (the golden settings).
    s = _start(tmp_path, env={"VDIFF_FAULT_OOM_TOKENS": "120"})
    try:
        with ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(_complete, s, p, **REFERENCE) for p in PROMPTS[:4]]
            too_big = pool.submit(_complete, s, PROMPTS[0] * 5)
            got = [_tokens(f.result()) for f in futures]
        assert got == ANSWERS[:4]
        assert "out of memory on a batch of" in s.procs[0].output()  # it did split
        assert too_big.result().status_code == 503
        assert "out of memory" in too_big.result().json()["error"]["message"]
        assert _complete(s, PROMPTS[0]).status_code == 200  # the worker stayed up
    finally:
        s.procs[0].stop()


def test_request_timeout_ends_the_request_and_frees_the_slot(tmp_path: Path) -> None:
    s = _start(tmp_path, "--request-timeout", "0.5")
    try:
        r = _complete(s, PROMPTS[0], max_tokens=480, diffusion_steps=480, eos_early_stop=False)
        assert r.status_code == 408
        assert "timed out" in r.json()["error"]["message"]
        assert _wait(lambda: _stats(s)["running"] == 0)
        assert _complete(s, PROMPTS[0]).status_code == 200
    finally:
        assert s.procs[0].stop() == 0


def test_a_job_that_cannot_start_fails_alone(tmp_path: Path) -> None:
    template = tmp_path / "strict.jinja"
    template.write_text(
        "{% if messages|length > 1 %}{{ raise_exception('Conversation roles "
        "must alternate') }}{% endif %}{{ messages[0]['content'] }}"
    )
    s = _start(tmp_path, "--chat-template", str(template))
    try:
        r = httpx.post(
            s.url + "/chat/completions",
            timeout=60,
            json={
                "model": "llada-tiny",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            },
        )
        assert r.status_code == 400 and "alternate" in r.json()["error"]["message"]
        assert _complete(s, PROMPTS[0]).status_code == 200  # the engine thread lives on
    finally:
        assert s.procs[0].stop() == 0


def test_reused_request_ids_in_flight_do_not_collide(server: Server) -> None:
    def call(prompt: list[int]) -> httpx.Response:
        return httpx.post(
            server.url + "/completions",
            timeout=60,
            headers={"x-request-id": "same-id"},
            json={
                "model": "llada-tiny",
                "prompt": prompt,
                "max_tokens": 32,
                "block_length": 8,
                "return_token_ids": True,
            },
        )

    alone = [_tokens(_complete(server, p)) for p in PROMPTS[:3]]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(call, PROMPTS[:3]))
    assert [_tokens(r) for r in got] == alone
    assert all(r.headers["x-request-id"] == "same-id" for r in got)


def test_max_model_len_caps_the_context_and_the_cache_slots(tmp_path: Path) -> None:
    s = _start(tmp_path, "--max-model-len", "64", "--max-num-seqs", "2")
    try:
        listed = httpx.get(s.url + "/models").json()["data"][0]
        assert listed["max_model_len"] == 64
        r = _complete(s, PROMPTS[0], max_tokens=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        assert "64 tokens" in r.json()["error"]["message"]
        assert _complete(s, PROMPTS[0], max_tokens=16).status_code == 200
        log = s.procs[0].log.read_text()
        assert "main KV cache: 2 slots x 64 positions" in log
    finally:
        for p in s.procs:
            p.stop()

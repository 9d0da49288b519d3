"""Rate limits through real processes: per client IP (X-Forwarded-For from trusted proxies
only) and per API key for generated tokens; 429 with Retry-After and x-ratelimit headers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import Server, free_port, spawn, wait_ready
from tests.e2e.conftest import FILE_KEYS, TOKENS_PER_MINUTE


@contextmanager
def _gateway(tmp: Path, *flags: str) -> Iterator[str]:
    port = free_port()
    proc = spawn(
        "vdiff_api.cli",
        ["--port", str(port), "--zmq-bind", f"tcp://127.0.0.1:{free_port()}", *flags],
        tmp / f"gateway-{port}.log",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, [proc], path="/health/live")
        yield base
    finally:
        assert proc.stop() == 0


def _models(base: str, xff: str) -> httpx.Response:
    return httpx.get(base + "/v1/models", headers={"X-Forwarded-For": xff})


def test_requests_per_minute_per_client_behind_a_trusted_proxy(tmp_path: Path) -> None:
    with _gateway(
        tmp_path, "--rate-limit-requests", "3", "--trusted-proxies", "127.0.0.0/8"
    ) as base:
        got = [_models(base, "203.0.113.5") for _ in range(3)]
        assert [r.status_code for r in got] == [200, 200, 200]
        assert [r.headers["x-ratelimit-remaining-requests"] for r in got] == ["2", "1", "0"]
        assert got[0].headers["x-ratelimit-limit-requests"] == "3"
        assert got[0].headers["x-ratelimit-reset-requests"].endswith("s")
        assert "x-ratelimit-limit-tokens" not in got[0].headers  # that limit is off
        # A forged left part does not make a new client.
        refused = _models(base, "198.51.100.77, 203.0.113.5")
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        err = refused.json()["error"]
        assert err["type"] == "rate_limit_error" and "requests" in err["message"]
        assert _models(base, "203.0.113.6").status_code == 200  # another client
        assert "x-ratelimit-limit-requests" not in httpx.get(base + "/health/live").headers


def test_forwarded_for_is_ignored_without_trusted_proxies(tmp_path: Path) -> None:
    with _gateway(tmp_path, "--rate-limit-requests", "2") as base:
        codes = [_models(base, f"203.0.113.{i}").status_code for i in range(3)]
        assert codes == [200, 200, 429]  # all of them are 127.0.0.1


def test_generated_tokens_per_minute_per_key(secured: Server) -> None:
    key = {"Authorization": f"Bearer {FILE_KEYS[-1]}"}
    body = {
        "model": "llada-tiny",
        "prompt": "Count: 1 2 3",
        "max_tokens": 32,
        "eos_early_stop": False,
    }
    spent, start = 0, time.monotonic()
    for _ in range(TOKENS_PER_MINUTE):
        r = httpx.post(secured.url + "/completions", json=body, headers=key, timeout=60)
        assert r.headers["x-ratelimit-limit-tokens"] == str(TOKENS_PER_MINUTE)
        assert "x-ratelimit-limit-requests" not in r.headers
        if r.status_code == 429:
            break
        assert r.status_code == 200, r.text
        remaining = int(r.headers["x-ratelimit-remaining-tokens"])
        refilled = (time.monotonic() - start) * TOKENS_PER_MINUTE / 60
        assert TOKENS_PER_MINUTE - spent <= remaining <= TOKENS_PER_MINUTE - spent + refilled
        spent += r.json()["usage"]["completion_tokens"]
    assert r.status_code == 429 and spent >= TOKENS_PER_MINUTE - 1
    assert "generated tokens" in r.json()["error"]["message"]
    assert int(r.headers["retry-after"]) >= 1
    # Streams carry the headers too; another key has its own budget.
    other = {"Authorization": f"Bearer {FILE_KEYS[-2]}"}
    with httpx.stream(
        "POST",
        secured.url + "/completions",
        headers=other,
        timeout=60,
        json={**body, "max_tokens": 8, "stream": True},
    ) as s:
        assert s.status_code == 200
        assert s.headers["x-ratelimit-remaining-tokens"] == str(TOKENS_PER_MINUTE)
        assert s.read().decode().rstrip().endswith("data: [DONE]")

"""API keys: Bearer required on /v1/*, /tokenize, /detokenize; probes stay open; keys are
never logged; flags that cannot work are refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Server, free_port, spawn, wait_ready
from tests.e2e.conftest import ENV_KEYS, FILE_KEYS

KEYED = [
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/engine/stats"),
    ("POST", "/v1/nonexistent"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
]
OPEN = [
    "/health",
    "/health/live",
    "/health/ready",
    "/metrics",
    "/version",
    "/openapi.json",
    "/docs",
    "/docs/assets/swagger-ui.css",
]
WRONG = "wrong-key-3f9a"


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(("method", "path"), KEYED)
def test_keyed_routes_refuse_missing_and_wrong_keys(
    secured: Server, method: str, path: str
) -> None:
    body = {"model": "llada-tiny", "prompt": "hi", "max_tokens": 4}
    for headers in (
        {},
        _bearer(WRONG),
        {"Authorization": f"Basic {ENV_KEYS[0]}"},
        {"Authorization": "Bearer"},
    ):
        r = httpx.request(
            method, secured.base + path, headers=headers, json=body if method == "POST" else None
        )
        assert r.status_code == 401, (path, headers, r.text)
        err = r.json()["error"]
        assert err["type"] == "authentication_error" and err["code"] == 401
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.headers["x-request-id"]
        assert WRONG not in r.text and ENV_KEYS[0] not in r.text


def test_probes_stay_open(secured: Server) -> None:
    for path in OPEN:
        assert httpx.get(secured.base + path).status_code == 200, path


def test_sdk_with_env_and_file_keys(secured: Server) -> None:
    for key in (ENV_KEYS[1], FILE_KEYS[0]):
        client = openai.OpenAI(base_url=secured.url, api_key=key, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["llada-tiny"]
        out = client.completions.create(model="llada-tiny", prompt="What is 2 + 3?", max_tokens=8)
        assert out.choices[0].finish_reason in ("stop", "length")
    bad = openai.OpenAI(base_url=secured.url, api_key=WRONG, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_keys_never_reach_the_logs(secured: Server) -> None:
    httpx.get(secured.url + "/models", headers=_bearer(WRONG))
    httpx.get(secured.url + "/models", headers=_bearer(ENV_KEYS[0]))
    log = secured.procs[0].output()
    assert '"path": "/v1/models"' in log  # the access lines are there ...
    for key in [*ENV_KEYS, *FILE_KEYS, WRONG]:
        assert key not in log  # ... without any key


def test_flag_keys_beat_the_environment_and_protect_metrics(tmp_path: Path) -> None:
    port = free_port()
    gateway = spawn(
        "vdiff_api.cli",
        [
            "--port",
            str(port),
            "--zmq-bind",
            f"tcp://127.0.0.1:{free_port()}",
            "--api-key",
            "flag-a",
            "--api-key",
            "flag-b",
            "--protect-metrics",
        ],
        tmp_path / "gateway.log",
        env={"VDIFF_API_KEY": "from-env"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, [gateway], path="/health/live")
        for key in ("flag-a", "flag-b"):
            assert httpx.get(base + "/v1/models", headers=_bearer(key)).status_code == 200
            assert httpx.get(base + "/metrics", headers=_bearer(key)).status_code == 200
        assert httpx.get(base + "/v1/models", headers=_bearer("from-env")).status_code == 401
        assert httpx.get(base + "/metrics").status_code == 401
        assert httpx.get(base + "/health/live").status_code == 200
        assert httpx.get(base + "/version").status_code == 200
    finally:
        assert gateway.stop() == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--protect-metrics"], "--protect-metrics needs API keys"),
        (["--api-key-file", "/nonexistent/keys"], "--api-key-file /nonexistent/keys"),
        (["--api-key-file", "EMPTY"], "holds no keys"),
        (["--rate-limit-requests", "-1"], "rate limits must be 0 (off) or positive"),
        (["--trusted-proxies", "10.0.0.0/33"], "--trusted-proxies"),
    ],
)
def test_flags_that_cannot_work_are_refused(tmp_path: Path, flags: list[str], message: str) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    flags = [str(empty) if f == "EMPTY" else f for f in flags]
    out = subprocess.run(
        [sys.executable, "-m", "vdiff_api.cli", "--port", str(free_port()), *flags],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert message in out.stderr

"""Token-exact parity with the APD paper's sampler (Dream drafts, an AR model verifies) through
the running server, and its start-up refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import GOLDEN, Server, start_allinone
from tests.e2e.test_golden_dream import answer

CASES = json.loads((GOLDEN / "cases" / "shared_apd.json").read_text())["apd"]


@pytest.fixture(scope="module")
def apd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_allinone(
        tmp_path_factory.mktemp("apd"),
        "--model",
        str(GOLDEN / "dream-tiny"),
        "--enable-apd",
        "--apd-verifier",
        str(GOLDEN / "ar-tiny"),
    )
    yield server
    for p in server.procs:
        p.stop()


def body(case: dict) -> dict[str, object]:
    p = case["params"]
    out: dict[str, object] = {
        "model": "dream-tiny",
        "prompt": case["prompt_ids"],
        "max_tokens": p["max_new_tokens"],
        "temperature": p["temperature"],
        "decoding": "apd",
        "apd_mixture_weight": p["apd_mixture_weight"],
        "return_token_ids": True,
    }
    if p["kv_window"] is not None:
        out["apd_kv_window"] = p["kv_window"]
    if p["max_lookahead"] is not None:
        out["apd_max_lookahead"] = p["max_lookahead"]
    return out


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: (
        "R{apd_mixture_weight}-W{kv_window}-M{max_lookahead}-".format(**c["params"]) + c["task"]
    ),
)
def test_apd_case(apd_server: Server, case: dict) -> None:
    r = httpx.post(apd_server.url + "/completions", json=body(case), timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["token_ids"] == answer(case["output_ids"])
    # Each round is one draft pass and one verifier pass; the server may stop a round early
    # (at end of turn) where the reference waits for end of text.
    assert out["usage"]["forward_passes"] <= 2 * len(case["acceptance_counts"])


def test_reference_decoding_still_served(apd_server: Server) -> None:
    case = CASES[0]
    req = {**body(case), "decoding": "reference", "diffusion_steps": 32}
    for key in ("apd_mixture_weight", "apd_kv_window", "apd_max_lookahead"):
        req.pop(key, None)
    r = httpx.post(apd_server.url + "/completions", json=req, timeout=120)
    assert r.status_code == 200, r.text


def test_apd_on_a_llada_server_is_refused(llada_server: Server) -> None:
    req = {"model": "llada-tiny", "prompt": "hi", "max_tokens": 8, "decoding": "apd"}
    r = httpx.post(llada_server.url + "/completions", json=req, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "decoding"


def test_enabling_apd_without_a_verifier_stops_the_worker() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vdiff_worker",
            "--model",
            str(GOLDEN / "dream-tiny"),
            "--enable-apd",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--enable-apd needs --apd-verifier" in done.stdout + done.stderr

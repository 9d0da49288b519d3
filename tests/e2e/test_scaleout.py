"""N gateways x M workers on loopback: pools, failures, restarts, rolling drains."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import GOLDEN, Proc, free_port, spawn, until, wait_ready

HB = "0.2"  # heartbeat interval: a dead peer is noticed after 0.6 s
CASES = json.loads((GOLDEN / "cases" / "shared_llada.json").read_text())
CASE = CASES["generate"][0]
PROMPT = CASE["prompt_ids"]
# The golden case's own settings, so an answer can be checked against LLaDA's generate().
GOLDEN_BODY = {
    "decoding": "reference",
    "max_tokens": CASE["params"]["gen_length"],
    "diffusion_steps": CASE["params"]["steps"],
    "block_length": CASE["params"]["block_length"],
    "temperature": 0.0,
    "return_token_ids": True,
}
STOP = {CASES["eos_token_id"], 485}  # <|endoftext|>, <|eot_id|>
WANT = CASE["output_ids"][: next(i for i, t in enumerate(CASE["output_ids"]) if t in STOP)]


@dataclass
class Cluster:
    tmp: Path
    gateways: dict[str, tuple[str, str, Proc]] = field(default_factory=dict)  # name: base, zmq
    workers: dict[str, Proc] = field(default_factory=dict)

    def gateway(self, name: str, port: int | None = None, zport: int | None = None) -> str:
        port, zport = port or free_port(), zport or free_port()
        zmq = f"tcp://127.0.0.1:{zport}"
        proc = spawn(
            "vdiff_api.cli",
            ["--port", str(port), "--zmq-bind", zmq, "--heartbeat-interval", HB],
            self.tmp / f"gw-{name}-{time.monotonic_ns()}.log",
        )
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, [proc], path="/health/live")
        self.gateways[name] = (base, zmq, proc)
        return base

    def worker(self, name: str, model: str = "llada-tiny", *gateways: str) -> Proc:
        flags = [
            "--model",
            str(GOLDEN / model),
            "--worker-id",
            name,
            "--num-threads",
            "1",
            "--heartbeat-interval",
            HB,
        ]
        for g in gateways or list(self.gateways):
            flags += ["--gateway", self.gateways[g][1]]
        proc = spawn("vdiff_worker", flags, self.tmp / f"w-{name}-{time.monotonic_ns()}.log")
        self.workers[name] = proc
        return proc

    def close(self) -> None:
        for p in [*self.workers.values(), *(g[2] for g in self.gateways.values())]:
            p.stop(signal.SIGKILL, timeout=5)


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.close()


def _workers(base: str) -> dict[str, dict]:
    return {w["id"]: w for w in httpx.get(base + "/health").json()["workers"]}


def _complete(base: str, model: str = "llada-tiny", **extra: object) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, **GOLDEN_BODY, **extra}
    return httpx.post(base + "/v1/completions", json=body, timeout=60)


def _golden(r: httpx.Response) -> bool:
    """An answer, and the reference's: not just a 200."""
    return r.status_code == 200 and r.json()["choices"][0]["token_ids"] == WANT


def test_killed_worker_mid_stream_then_restarted(cluster: Cluster) -> None:
    base = cluster.gateway("g")
    cluster.worker("w1")
    cluster.worker("w2")
    until(lambda: len(_workers(base)) == 2)
    long = {
        "max_tokens": 192,
        "diffusion_steps": 192,
        "block_length": 8,
        "eos_early_stop": False,
        "stream": True,
    }
    outcomes: list[str] = []
    started = threading.Semaphore(0)

    def stream() -> None:
        events = []
        with httpx.stream(
            "POST",
            base + "/v1/completions",
            timeout=60,
            json={"model": "llada-tiny", "prompt": PROMPT, **long},
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    if len(events) == 1:
                        started.release()
        assert events[-1] == "data: [DONE]"
        outcomes.append("error" if '"error"' in events[-2] else "done")

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in threads:
        assert started.acquire(timeout=30)  # every stream has output: none may be retried
    assert all(w["inflight"] == 2 for w in _workers(base).values())
    cluster.workers["w1"].stop(signal.SIGKILL)
    until(lambda: set(_workers(base)) == {"w2"})
    # A new request reaches the survivor: its first block streams back.
    with httpx.stream(
        "POST",
        base + "/v1/completions",
        timeout=60,
        json={
            "model": "llada-tiny",
            "prompt": PROMPT,
            "max_tokens": 32,
            "block_length": 8,
            "stream": True,
        },
    ) as r:
        first = next(e for e in r.iter_lines() if e.startswith("data: "))
        assert '"text"' in first
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcomes) == ["done", "done", "error", "error"], outcomes
    cluster.worker("w1")
    until(lambda: set(_workers(base)) == {"w1", "w2"})
    for _ in range(4):
        assert _golden(_complete(base))


def test_unstarted_job_of_a_dead_worker_is_retried_on_another(cluster: Cluster) -> None:
    base = cluster.gateway("g")
    cluster.worker("w1")
    cluster.worker("w2")
    until(lambda: len(_workers(base)) == 2)
    # A non-streaming request that produces no output before its worker dies is retried.
    body = {"max_tokens": 128, "diffusion_steps": 128, "block_length": 128, "eos_early_stop": False}
    want = _complete(base, **body).json()["choices"][0]["token_ids"]
    results: list[httpx.Response] = []
    threads = [
        threading.Thread(target=lambda: results.append(_complete(base, **body))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    until(lambda: all(w["inflight"] == 1 for w in _workers(base).values()))
    cluster.workers["w1"].stop(signal.SIGKILL)
    for t in threads:
        t.join(timeout=60)
    # Both answered, with the tokens an undisturbed run gives, and the gateway's access log
    # says the retried one went to w1 and then to w2.
    assert [r.status_code for r in results] == [200, 200]
    assert [r.json()["choices"][0]["token_ids"] for r in results] == [want, want]
    assert re.search(
        r"status=200 model=llada-tiny .* worker=w1,w2 ", cluster.gateways["g"][2].output()
    )


def test_two_gateways_one_worker(cluster: Cluster) -> None:
    a, b = cluster.gateway("a"), cluster.gateway("b")
    cluster.worker("w")
    until(lambda: _workers(a) and _workers(b))
    assert _golden(_complete(a)) and _golden(_complete(b))
    for g in ("a", "b"):  # each gateway's access log names the worker that answered
        assert re.search(
            r"status=200 model=llada-tiny .* worker=w ", cluster.gateways[g][2].output()
        )


def test_restarted_gateway_is_rejoined_without_worker_restart(cluster: Cluster) -> None:
    port, zport = free_port(), free_port()
    base = cluster.gateway("g", port, zport)
    cluster.worker("w")
    until(lambda: _workers(base))
    cluster.gateways["g"][2].stop(signal.SIGKILL)
    cluster.gateway("g", port, zport)
    until(lambda: _workers(base), timeout=10)
    assert _golden(_complete(base))


def test_model_pools_behind_one_gateway(cluster: Cluster) -> None:
    base = cluster.gateway("g")
    cluster.worker("llada", "llada-tiny")
    cluster.worker("ar", "ar-tiny")
    until(lambda: len(_workers(base)) == 2)
    models = {m["id"] for m in httpx.get(base + "/v1/models").json()["data"]}
    assert models == {"llada-tiny", "ar-tiny"}
    assert _golden(_complete(base, "llada-tiny"))
    r = httpx.post(
        base + "/v1/completions",
        timeout=60,
        json={"model": "ar-tiny", "prompt": "What is 2 + 3?", "max_tokens": 8},
    )
    assert r.status_code == 200
    stats = {w["id"]: w for w in httpx.get(base + "/v1/engine/stats").json()["workers"]}
    assert stats["llada"]["models"] == ["llada-tiny"] and stats["ar"]["models"] == ["ar-tiny"]
    cluster.workers["ar"].stop(signal.SIGKILL)
    until(lambda: set(_workers(base)) == {"llada"})
    assert _complete(base, "ar-tiny").status_code == 503  # seen before, now gone
    assert _complete(base, "never-served").status_code == 404


def test_rolling_sigterm_loses_no_request(cluster: Cluster) -> None:
    base = cluster.gateway("g")
    cluster.worker("w1")
    cluster.worker("w2")
    until(lambda: len(_workers(base)) == 2)
    codes: list[int] = []
    wrong: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            r = _complete(base)
            codes.append(r.status_code)
            if r.status_code == 200 and not _golden(r):
                wrong.append(r.text)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert cluster.workers["w1"].stop(signal.SIGTERM) == 0
    cluster.worker("w1")
    until(lambda: len(_workers(base)) == 2)
    assert cluster.workers["w2"].stop(signal.SIGTERM) == 0
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert codes and set(codes) == {200}, codes
    assert not wrong  # every answer the reference's, across both drains

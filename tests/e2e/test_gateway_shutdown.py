"""Lifecycle through real processes: SIGTERM drains the all-in-one `vdiff` (unready while its
stream still runs); a SIGKILLed worker turns the gateway unready and is dropped as silent for 3
heartbeats (the exact bound, on the gateway's clock: tests/api/test_dispatcher.py)."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import GOLDEN, free_port, spawn, start_allinone, until, wait_ready

PROMPT = json.loads((GOLDEN / "cases" / "shared_llada.json").read_text())["generate"][0][
    "prompt_ids"
]
LONG = {
    "model": "llada-tiny",
    "prompt": PROMPT,
    "max_tokens": 192,
    "diffusion_steps": 192,
    "block_length": 8,
    "eos_early_stop": False,
    "stream": True,
}


def _ready(base: str) -> int:
    return httpx.get(base + "/health/ready", timeout=2).status_code


def test_sigterm_drains_the_allinone_server(tmp_path: Path) -> None:
    server = start_allinone(
        tmp_path, "--model", str(GOLDEN / "llada-tiny"), "--heartbeat-interval", "0.2"
    )
    proc = server.procs[0]
    events: list[str] = []
    first = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", server.url + "/completions", json=LONG, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    try:
        assert first.wait(60)
        proc.popen.send_signal(signal.SIGTERM)
        while _ready(server.base) != 503:
            assert reader.is_alive(), "ready stayed 200 until the drained stream ended"
            time.sleep(0.02)
        refused = httpx.post(
            server.url + "/completions",
            timeout=10,
            json={"model": "llada-tiny", "prompt": "hi", "max_tokens": 4},
        )
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "service_unavailable"
        assert refused.headers["retry-after"]
        assert refused.headers["connection"] == "close"  # no keep-alive to close under a client
        assert not events or events[-1] != "data: [DONE]", "the stream was too short to test"
    finally:
        reader.join(timeout=120)
    assert events[-1] == "data: [DONE]"
    assert not any('"error"' in e for e in events)
    assert json.loads(events[-2][len("data: ") :])["choices"][0]["finish_reason"] in (
        "stop",
        "length",
    )
    assert proc.popen.wait(timeout=60) == 0


def test_sigkilled_worker_turns_ready_off_and_is_dropped_as_silent(tmp_path: Path) -> None:
    port, zmq = free_port(), f"tcp://127.0.0.1:{free_port()}"
    base, hb = f"http://127.0.0.1:{port}", 0.5
    gateway = spawn(
        "vdiff_api.cli",
        ["--port", str(port), "--zmq-bind", zmq, "--heartbeat-interval", str(hb)],
        tmp_path / "gw.log",
    )
    worker = spawn(
        "vdiff_worker",
        [
            "--model",
            str(GOLDEN / "llada-tiny"),
            "--gateway",
            zmq,
            "--num-threads",
            "1",
            "--heartbeat-interval",
            str(hb),
        ],
        tmp_path / "worker.log",
    )
    try:
        wait_ready(base, [gateway, worker])
        worker.stop(signal.SIGKILL)
        until(lambda: _ready(base) == 503)
        r = httpx.post(base + "/v1/completions", json={"model": "llada-tiny", "prompt": "x"})
        assert r.status_code == 503
        until(lambda: not httpx.get(base + "/health").json()["workers"])  # and it is forgotten
        assert "is dead (silent for 3 heartbeats); 0 jobs affected" in gateway.output()
    finally:
        worker.stop(signal.SIGKILL)
        assert gateway.stop() == 0

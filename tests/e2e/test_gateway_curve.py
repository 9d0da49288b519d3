"""CURVE on the worker socket: `vdiff keys generate`, only authorized workers register;
a non-loopback bind without CURVE is warned about; missing keys are refused."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import zmq

from tests.conftest import GOLDEN, free_port, spawn, start_allinone, wait_ready
from vdiff_common import protocol


def _keys(directory: Path, *flags: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "vdiff_api", "keys", "generate", str(directory), *flags],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def _plain_register(zmq_address: str) -> bool:
    """Whether a DEALER without CURVE gets any answer to a Register."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(zmq_address)
    sock.send(
        protocol.encode(
            protocol.Register(
                version=protocol.PROTOCOL_VERSION, worker_id="plain", models=[], capacity=1
            )
        )
    )
    answered = sock.poll(1500) != 0
    sock.close()
    ctx.term()
    return answered


def test_only_workers_with_authorized_keys_register(tmp_path: Path) -> None:
    keys, stranger = tmp_path / "keys", tmp_path / "stranger"
    made = _keys(keys)
    assert {Path(p).relative_to(keys).as_posix() for p in made} == {
        "gateway.key",
        "gateway.key_secret",
        "worker.key",
        "worker.key_secret",
        "authorized/worker.key",
    }
    assert (keys / "gateway.key_secret").stat().st_mode & 0o077 == 0
    _keys(stranger)  # a keypair of its own, not authorized by `keys`
    shutil.copy(keys / "gateway.key", stranger / "gateway.key")  # it knows the server key
    server = start_allinone(
        tmp_path,
        "--model",
        str(GOLDEN / "llada-tiny"),
        "--zmq-curve-dir",
        str(keys),
        "--heartbeat-interval",
        "0.2",
    )
    worker = spawn(
        "vdiff_worker",
        [
            "--model",
            str(GOLDEN / "llada-tiny"),
            "--gateway",
            server.zmq,
            "--zmq-curve-dir",
            str(stranger),
            "--worker-id",
            "stranger",
            "--num-threads",
            "1",
            "--heartbeat-interval",
            "0.2",
        ],
        tmp_path / "stranger.log",
    )
    try:
        r = httpx.post(
            server.url + "/completions",
            timeout=60,
            json={"model": "llada-tiny", "prompt": "hi", "max_tokens": 8},
        )
        assert r.status_code == 200  # the local worker, with the authorized key, serves
        assert not _plain_register(server.zmq)
        deadline = time.monotonic() + 60
        while "connecting to gateway" not in worker.output():
            assert time.monotonic() < deadline and worker.popen.poll() is None
            time.sleep(0.1)
        time.sleep(1.0)  # five heartbeats: five chances to register
        ids = [w["id"] for w in httpx.get(server.base + "/health").json()["workers"]]
        assert ids == ["local-0"]
        assert "registered with gateway" not in worker.output()
        log = server.procs[0].output()
        assert "(CURVE)" in log and "refused a worker whose CURVE public key" in log
        assert "reachable from other hosts without CURVE" not in log
    finally:
        worker.stop()
        assert server.procs[0].stop() == 0


def test_non_loopback_bind_without_curve_is_warned_about(tmp_path: Path) -> None:
    port = free_port()
    gateway = spawn(
        "vdiff_api.cli",
        ["--port", str(port), "--zmq-bind", f"tcp://0.0.0.0:{free_port()}"],
        tmp_path / "gw.log",
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", [gateway], path="/health/live")
        assert "reachable from other hosts without CURVE" in gateway.output()
    finally:
        assert gateway.stop() == 0


def test_missing_keys_are_refused(tmp_path: Path) -> None:
    _keys(tmp_path / "k", "--worker", "w2")
    assert (tmp_path / "k" / "authorized" / "w2.key").is_file()
    assert not (tmp_path / "k" / "authorized" / "worker.key").exists()
    (tmp_path / "k" / "authorized" / "w2.key").unlink()
    for directory, message in (
        (tmp_path / "none", "gateway.key_secret is missing"),
        (tmp_path / "k", "holds no worker public keys"),
    ):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "vdiff_api.cli",
                "--port",
                str(free_port()),
                "--zmq-curve-dir",
                str(directory),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 2 and message in out.stderr, out.stderr

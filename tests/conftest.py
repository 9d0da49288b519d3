"""Shared test helpers: free ports, real server processes, waiting for readiness."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from vdiff_api.launcher import die_with_parent

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "data" / "golden"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def spawn(module: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    fh = log.open("wb")
    popen = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=fh,
        stderr=subprocess.STDOUT,
        env=full_env,
        preexec_fn=die_with_parent,
    )
    return Proc(popen, log)


def wait_ready(
    base: str, procs: list[Proc], timeout: float = 120.0, path: str = "/health/ready"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.popen.poll() is not None:
                raise RuntimeError(f"process exited early:\n{p.output()[-3000:]}")
        try:
            if httpx.get(f"{base}{path}", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(
        f"{path} never answered 200:\n" + "\n".join(p.output()[-2000:] for p in procs)
    )


def until(cond: Callable[[], object], timeout: float = 30.0) -> None:
    """Wait for an event: ``cond()`` true (an HTTP error counts as not yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@dataclass
class Server:
    base: str
    zmq: str
    procs: list[Proc]

    @property
    def url(self) -> str:
        return self.base + "/v1"


def start_allinone(
    tmp: Path, *flags: str, env: dict[str, str] | None = None, ready_timeout: float = 120.0
) -> Server:
    port, zport = free_port(), free_port()
    zmq = f"tcp://127.0.0.1:{zport}"
    proc = spawn(
        "vdiff_api",
        ["--port", str(port), "--zmq-bind", zmq, "--num-threads", "1", *flags],
        tmp / f"vdiff-{port}.log",
        env,
    )
    server = Server(f"http://127.0.0.1:{port}", zmq, [proc])
    wait_ready(server.base, [proc], timeout=ready_timeout)
    return server


@pytest.fixture(scope="session")
def llada_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_allinone(tmp_path_factory.mktemp("llada"), "--model", str(GOLDEN / "llada-tiny"))
    yield server
    for p in server.procs:
        p.stop()

"""`make metrics-check`: `promtool check metrics` on the gateway's and a worker's /metrics.

Starts a gateway and a worker with --metrics-port, sends one request so every series has a
sample, and runs promtool (from Debian's prometheus package, installed when missing) on both
outputs. Not part of `make test`: it needs a system package.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from tests.conftest import GOLDEN, free_port, spawn, wait_ready


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"], check=True
        )
        found = shutil.which("promtool")
    if found is None:
        sys.exit("metrics-check: cannot find or install promtool")
    return found


def main() -> None:
    tool = promtool()
    port, zport, mport = free_port(), free_port(), free_port()
    zmq = f"tcp://127.0.0.1:{zport}"
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        gateway = spawn(
            "vdiff_api.cli", ["--port", str(port), "--zmq-bind", zmq], Path(tmp) / "gateway.log"
        )
        worker = spawn(
            "vdiff_worker",
            [
                "--model",
                str(GOLDEN / "llada-tiny"),
                "--gateway",
                zmq,
                "--metrics-port",
                str(mport),
                "--metrics-host",
                "127.0.0.1",
                "--num-threads",
                "1",
            ],
            Path(tmp) / "worker.log",
        )
        try:
            wait_ready(base, [gateway, worker])
            r = httpx.post(
                base + "/v1/completions",
                timeout=60,
                json={"prompt": "What is 2 + 3?", "max_tokens": 8},
            )
            r.raise_for_status()
            failed = []
            for name, url in (
                ("gateway", base + "/metrics"),
                ("worker", f"http://127.0.0.1:{mport}/metrics"),
            ):
                text = httpx.get(url, timeout=10).text
                out = subprocess.run(
                    [tool, "check", "metrics"], input=text, capture_output=True, text=True
                )
                print(
                    f"{name}: {len(text.splitlines())} lines, promtool rc={out.returncode}"
                    f"{' ' + out.stdout + out.stderr if out.returncode else ''}"
                )
                if out.returncode != 0:
                    failed.append(name)
        finally:
            worker.stop()
            gateway.stop()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

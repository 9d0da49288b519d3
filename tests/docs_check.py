"""`make docs-check`: render /docs in headless Chromium and check it shows the endpoints.

Starts a gateway alone (the docs need no worker), takes a screenshot of /docs into
build/docs/docs.png and checks the DOM Chromium rendered lists /v1/completions and
/v1/chat/completions. Installs Debian's chromium when it is missing. Not part of
`make test`: it needs a browser.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile

from tests.conftest import ROOT, free_port, spawn, wait_ready

OUT = ROOT / "build" / "docs"
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/tokenize")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=15000",
    "--window-size=1280,1600",
]


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        subprocess.run(["apt-get", "update"], check=True)
        subprocess.run(["apt-get", "install", "-y", "chromium"], check=True)
        found = shutil.which("chromium")
    if found is None:
        sys.exit("docs-check: cannot find or install chromium")
    return found


def browse(browser: str, url: str, *extra: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run(
            [browser, *FLAGS, f"--user-data-dir={profile}", *extra, url],
            capture_output=True,
            text=True,
            timeout=120,
        )
    if out.returncode != 0:
        sys.exit(f"docs-check: chromium failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return out.stdout


def main() -> None:
    browser = chromium()
    OUT.mkdir(parents=True, exist_ok=True)
    port = free_port()
    gateway = spawn(
        "vdiff_api.cli",
        ["--port", str(port), "--zmq-bind", f"tcp://127.0.0.1:{free_port()}"],
        OUT / "gateway.log",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, [gateway], timeout=30, path="/health/live")
        shot = OUT / "docs.png"
        browse(browser, base + "/docs", f"--screenshot={shot}")
        dom = browse(browser, base + "/docs", "--dump-dom")
    finally:
        gateway.stop()
    (OUT / "docs.html").write_text(dom)
    missing = [e for e in ENDPOINTS if f'data-path="{e}"' not in dom]
    if missing or not shot.is_file() or shot.stat().st_size < 10_000:
        sys.exit(f"docs-check: /docs does not show {missing or 'a screenshot'}; see {OUT}")
    print(f"docs-check: /docs shows {', '.join(ENDPOINTS)}; screenshot {shot}")


if __name__ == "__main__":
    main()

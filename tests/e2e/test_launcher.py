"""The all-in-one `vdiff` never leaves orphaned workers behind, even when it is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import GOLDEN, start_allinone


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return (
        Path(f"/proc/{pid}").exists()
        and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    )


def test_workers_die_with_a_killed_launcher(tmp_path: Path) -> None:
    server = start_allinone(tmp_path, "--model", str(GOLDEN / "llada-tiny"), "--workers", "2")
    launcher = server.procs[0].popen.pid
    workers = _children(launcher)
    assert len(workers) == 2
    server.procs[0].stop(signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)

"""The gateway tier must stay free of torch and transformers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_gateway_packages_do_not_import_torch() -> None:
    code = (
        "import sys, vdiff_api.app, vdiff_api.launcher, vdiff_api.cli, vdiff_common.transport;"
        "print(' '.join(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_shipped_packages_do_not_import_bench() -> None:
    # bench/ is not in the wheel: nothing installed may need it.
    root = Path(__file__).resolve().parents[2]
    shipped = [
        p
        for pkg in ("vdiff_api", "vdiff_common", "vdiff_worker")
        for p in (root / pkg).rglob("*.py")
    ]
    users = [
        str(p.relative_to(root))
        for p in shipped
        if re.search(r"^\s*(from|import) bench\b", p.read_text(), re.MULTILINE)
    ]
    assert shipped and users == []
    include = re.search(
        r"^include = \[(.*)\]$", (root / "pyproject.toml").read_text(), re.MULTILINE
    )
    assert include is not None and "bench" not in include.group(1)

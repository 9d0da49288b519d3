"""The gateway tier must stay free of torch and transformers."""

from __future__ import annotations

import subprocess
import sys


def test_gateway_packages_do_not_import_torch() -> None:
    code = (
        "import sys, vdiff_api.app, vdiff_api.launcher, vdiff_api.cli, vdiff_common.transport;"
        "print(' '.join(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""

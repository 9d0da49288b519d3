"""Helpers shared by the benchmarks: a real server, a results folder, an optional plot."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

from tests.conftest import GOLDEN, Server, start_allinone  # noqa: E402

__all__ = ["GOLDEN", "RESULTS", "Server", "start_allinone", "table", "write_json", "plot"]


def table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    width = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.rjust(width[c]) for c in cols)]
    lines += ["  ".join(_fmt(r[c]).rjust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def write_json(name: str, data: Any) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def plot(
    name: str, x: Sequence[float], series: dict[str, Sequence[float]], xlabel: str, ylabel: str
) -> Path | None:
    """A PNG line plot, when matplotlib is installed (it is in the dev extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    # Many series: the legend goes beside the axes, where it hides no line.
    wide = len(series) > 4
    fig, ax = plt.subplots(figsize=(9, 4) if wide else (6, 4))
    for label, ys in series.items():
        ax.plot(x, ys, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if wide:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    else:
        ax.legend()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

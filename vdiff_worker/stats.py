"""Rolling engine statistics for heartbeats and /v1/engine/stats."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass


@dataclass
class _Step:
    at: float
    rows: int
    committed: int


class StepStats:
    """The last `window` steps: steps/s, tokens committed per forward, batch sizes."""

    def __init__(self, window: int = 200) -> None:
        self._steps: deque[_Step] = deque(maxlen=window)

    def record(self, rows: int, committed: int) -> None:
        self._steps.append(_Step(time.monotonic(), rows, committed))

    def steps_per_s(self) -> float:
        if len(self._steps) < 2:
            return 0.0
        span = self._steps[-1].at - self._steps[0].at
        # An idle gap makes old steps stale: a rate over them would understate the present.
        if span <= 0 or time.monotonic() - self._steps[-1].at > 5.0:
            return 0.0
        return (len(self._steps) - 1) / span

    def tokens_per_forward(self) -> float:
        rows = sum(s.rows for s in self._steps)
        return sum(s.committed for s in self._steps) / rows if rows else 0.0

    def batch_mean(self) -> float:
        return sum(s.rows for s in self._steps) / len(self._steps) if self._steps else 0.0

    def batch_max(self) -> int:
        return max((s.rows for s in self._steps), default=0)

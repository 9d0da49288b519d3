"""Per-client token buckets for requests and generated tokens per minute."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

_SWEEP_AT = 10_000  # buckets kept before idle (full) ones are forgotten


def duration(seconds: float) -> str:
    """OpenAI's reset format: 20ms, 1.5s, 6m0s."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    return f"{int(seconds // 60)}m{int(seconds % 60)}s"


@dataclass
class _Bucket:
    level: float
    stamp: float


class Budget:
    """`per_minute` units, refilled continuously; `level` may go below zero after a spend."""

    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def bucket(self, who: str) -> _Bucket:
        now = self._clock()
        b = self._buckets.get(who)
        if b is None:
            if len(self._buckets) >= _SWEEP_AT:
                self._sweep(now)
            b = self._buckets[who] = _Bucket(self.capacity, now)
        b.level = min(self.capacity, b.level + (now - b.stamp) * self.rate)
        b.stamp = now
        return b

    def _sweep(self, now: float) -> None:
        for who, b in list(self._buckets.items()):
            if b.level + (now - b.stamp) * self.rate >= self.capacity:
                del self._buckets[who]

    def wait_for(self, b: _Bucket, level: float) -> float:
        """Seconds until the bucket holds `level`."""
        return max(0.0, (level - b.level) / self.rate)

    def headers(self, kind: str, b: _Bucket) -> dict[str, str]:
        return {
            f"x-ratelimit-limit-{kind}": str(int(self.capacity)),
            f"x-ratelimit-remaining-{kind}": str(max(0, math.floor(b.level))),
            f"x-ratelimit-reset-{kind}": duration(self.wait_for(b, self.capacity)),
        }


@dataclass
class Decision:
    headers: dict[str, str]
    refused: str | None = None  # what ran out: "requests" or "tokens"
    retry_after: int = 0


class RateLimiter:
    """Requests cost one each up front; generated tokens are spent after the response (a
    bucket may go below zero), and a client waits until each bucket holds one unit again."""

    def __init__(
        self,
        requests_per_minute: int = 0,
        tokens_per_minute: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if requests_per_minute < 0 or tokens_per_minute < 0:
            raise ValueError("rate limits must be 0 (off) or positive")
        self.requests = Budget(requests_per_minute, clock) if requests_per_minute else None
        self.tokens = Budget(tokens_per_minute, clock) if tokens_per_minute else None

    @property
    def enabled(self) -> bool:
        return self.requests is not None or self.tokens is not None

    def admit(self, who: str) -> Decision:
        """Take one request if both buckets hold at least one unit; else say which is empty."""
        held = [
            (kind, budget, budget.bucket(who))
            for kind, budget in (("requests", self.requests), ("tokens", self.tokens))
            if budget is not None
        ]
        empty = next(((kind, budget, b) for kind, budget, b in held if b.level < 1), None)
        if empty is None and self.requests is not None:
            held[0][2].level -= 1
        headers: dict[str, str] = {}
        for kind, budget, b in held:
            headers.update(budget.headers(kind, b))
        if empty is None:
            return Decision(headers)
        kind, budget, b = empty
        return Decision(headers, kind, max(1, math.ceil(budget.wait_for(b, 1.0))))

    def spend(self, who: str, tokens: int) -> None:
        if self.tokens is not None and tokens:
            self.tokens.bucket(who).level -= tokens

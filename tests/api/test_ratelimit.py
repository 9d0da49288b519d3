"""Token buckets and client addresses, on a fake clock."""

from __future__ import annotations

import argparse

from starlette.datastructures import Headers

from vdiff_api.frontdoor import Policy
from vdiff_api.ratelimit import RateLimiter, duration


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_bucket_refills_continuously() -> None:
    clock = Clock()
    rl = RateLimiter(requests_per_minute=2, clock=clock)
    first, second, third = rl.admit("a"), rl.admit("a"), rl.admit("a")
    assert first.refused is None and first.headers["x-ratelimit-remaining-requests"] == "1"
    assert second.refused is None and second.headers["x-ratelimit-remaining-requests"] == "0"
    assert third.refused == "requests" and third.retry_after == 30
    assert third.headers["x-ratelimit-limit-requests"] == "2"
    assert third.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert rl.admit("b").refused is None  # every client has its own bucket
    clock.now += 30
    assert rl.admit("a").refused is None
    assert rl.admit("a").refused == "requests"


def test_tokens_are_spent_after_the_fact_and_may_go_below_zero() -> None:
    clock = Clock()
    rl = RateLimiter(tokens_per_minute=60, clock=clock)
    assert rl.admit("a").refused is None
    rl.spend("a", 90)  # one long answer overdraws the bucket
    refused = rl.admit("a")
    assert refused.refused == "tokens" and refused.retry_after == 31
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert "x-ratelimit-limit-requests" not in refused.headers
    clock.now += 31
    ok = rl.admit("a")
    assert ok.refused is None and ok.headers["x-ratelimit-remaining-tokens"] == "1"


def test_both_limits_report_both_triples_and_a_refusal_takes_nothing() -> None:
    clock = Clock()
    rl = RateLimiter(requests_per_minute=10, tokens_per_minute=100, clock=clock)
    rl.spend("a", 100)
    refused = rl.admit("a")
    assert refused.refused == "tokens"
    assert refused.headers["x-ratelimit-remaining-requests"] == "10"  # not taken
    assert set(refused.headers) == {
        f"x-ratelimit-{w}-{k}"
        for w in ("limit", "remaining", "reset")
        for k in ("requests", "tokens")
    }


def test_off_by_default() -> None:
    assert not RateLimiter().enabled
    assert RateLimiter().admit("a").headers == {}


def test_duration_format() -> None:
    assert [duration(s) for s in (0.0201, 1.5, 59.0, 360.0)] == ["21ms", "1.5s", "59s", "6m0s"]


def _policy(*trusted: str) -> Policy:
    args = argparse.Namespace(
        api_key=[],
        api_key_file=[],
        protect_metrics=False,
        rate_limit_requests=0,
        rate_limit_tokens=0,
        trusted_proxies=list(trusted),
    )
    return Policy.from_args(args)


def _client(policy: Policy, peer: str, xff: str | None) -> str:
    raw = [(b"x-forwarded-for", xff.encode())] if xff is not None else []
    scope = {"type": "http", "client": (peer, 1234), "headers": raw}
    return policy.client_ip(scope, Headers(scope=scope))


def test_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    none = _policy()
    assert _client(none, "10.0.0.7", "203.0.113.5") == "10.0.0.7"
    proxies = _policy("10.0.0.0/8", "fd00::/8")
    assert _client(proxies, "10.0.0.7", "203.0.113.5") == "203.0.113.5"
    assert _client(proxies, "10.0.0.7", None) == "10.0.0.7"
    # The client may write anything on the left; the nearest untrusted hop is its address.
    assert _client(proxies, "10.0.0.7", "1.2.3.4, 203.0.113.5, 10.1.1.1") == "203.0.113.5"
    assert _client(proxies, "fd00::1", "2001:db8::9") == "2001:db8::9"
    assert _client(proxies, "192.0.2.1", "203.0.113.5") == "192.0.2.1"

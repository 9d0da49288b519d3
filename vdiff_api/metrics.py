"""Gateway Prometheus metrics (the seed's vdiff_* names plus latency histograms)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# vLLM's request-latency buckets.
_LATENCY = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
_TTFT = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)

SUCCESS = Counter("vdiff_request_success", "Requests finished successfully", ["model_name"])
FAILURE = Counter(
    "vdiff_request_failure", "Requests that ended in an error", ["model_name", "status"]
)
LATENCY = Histogram(
    "vdiff_request_latency_seconds", "End-to-end request latency", ["model_name"], buckets=_LATENCY
)
TTFC = Histogram(
    "vdiff_time_to_first_chunk_seconds",
    "Time to the first streamed chunk",
    ["model_name"],
    buckets=_TTFT,
)
PROMPT_TOKENS = Counter("vdiff_prompt_tokens", "Prompt tokens processed", ["model_name"])
GENERATION_TOKENS = Counter("vdiff_generation_tokens", "Tokens generated", ["model_name"])
ACTIVE = Gauge("vdiff_active_requests", "Requests in flight at this gateway")
WORKERS = Gauge("vdiff_connected_workers", "Workers registered with this gateway")
REJECTED_FRAMES = Counter("vdiff_rejected_frames", "ZeroMQ frames that failed to decode")
_OVERHEAD = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5)
GATEWAY_OVERHEAD = Histogram(
    "vdiff_gateway_overhead_seconds",
    "The gateway's own time per request: request read to job out plus result in to response out",
    buckets=_OVERHEAD,
)
TRANSPORT_OVERHEAD = Histogram(
    "vdiff_transport_overhead_seconds",
    "Job out to last result in, less the worker's own time: sockets both ways and the "
    "worker's network side",
    buckets=_OVERHEAD,
)

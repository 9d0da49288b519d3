"""Worker Prometheus metrics, served on --metrics-port."""

from __future__ import annotations

import resource

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

_LABELS = ["model_name", "worker_id"]
# The worker's own registry: it is served on its own port, and the gateway's metrics of the
# same names (vdiff_active_requests, ...) must not collide when both live in one process.
REGISTRY = CollectorRegistry()

QUEUE = Gauge("vdiff_queue_size", "Sequences waiting for a slot", _LABELS, registry=REGISTRY)
ACTIVE = Gauge("vdiff_active_requests", "Sequences being decoded", _LABELS, registry=REGISTRY)
FORWARDS = Counter(
    "vdiff_forward_passes", "Model forward passes (rows)", _LABELS, registry=REGISTRY
)
PARALLEL = Counter(
    "vdiff_parallel_tokens_decoded", "Tokens committed by the samplers", _LABELS, registry=REGISTRY
)
TOKENS_PER_FORWARD = Histogram(
    "vdiff_tokens_per_forward",
    "Tokens one sequence committed in one forward pass",
    _LABELS,
    buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
    registry=REGISTRY,
)
BATCH = Histogram(
    "vdiff_batch_size",
    "Rows in one engine step",
    _LABELS,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
    registry=REGISTRY,
)
CALL_ROWS = Histogram(
    "vdiff_model_call_rows",
    "Rows (sequences) one model call carried",
    _LABELS,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
    registry=REGISTRY,
)
ABORTED = Counter(
    "vdiff_aborted_requests",
    "Requests their gateway aborted (the client left) while queued or running",
    _LABELS,
    registry=REGISTRY,
)
GPU_MEMORY = Gauge(
    "vdiff_gpu_memory_used_bytes", "Device memory in use", _LABELS, registry=REGISTRY
)
HOST_MEMORY = Gauge(
    "vdiff_host_memory_peak_bytes", "Peak resident host memory", _LABELS, registry=REGISTRY
)
ProcessCollector(registry=REGISTRY)


class WorkerMetrics:
    """The metric children of one worker, so the hot path does no label lookups."""

    def __init__(self, model: str, worker_id: str, device: torch.device | None = None) -> None:
        labels = (model, worker_id)
        # The GPU the model is on: CUDA's current device is per thread, and the engine's
        # thread would otherwise report cuda:0 whatever --device says.
        self.device = device if device is not None and device.type == "cuda" else None
        self.queue = QUEUE.labels(*labels)
        self.active = ACTIVE.labels(*labels)
        self.forwards = FORWARDS.labels(*labels)
        self.parallel = PARALLEL.labels(*labels)
        self.per_forward = TOKENS_PER_FORWARD.labels(*labels)
        self.batch = BATCH.labels(*labels)
        self.call_rows = CALL_ROWS.labels(*labels)
        self.aborted = ABORTED.labels(*labels)
        self.gpu_memory = GPU_MEMORY.labels(*labels)
        self.host_memory = HOST_MEMORY.labels(*labels)

    def memory(self) -> None:
        if self.device is not None:
            free, total = torch.cuda.mem_get_info(self.device)
            self.gpu_memory.set(total - free)
        self.host_memory.set(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def serve(port: int, host: str) -> None:
    start_http_server(port, addr=host, registry=REGISTRY)

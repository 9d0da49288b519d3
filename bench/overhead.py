"""What the gateway adds: one worker answers the same request directly over ZeroMQ and through
the gateway's HTTP API, alternating, one request at a time.

    .venv/bin/python -m bench.overhead --requests 300

The worker connects to two gateways: a real `vdiff-api` process, and the gateway's own
`Dispatcher` run in this script without HTTP around it. The direct path is the baseline:
ZeroMQ both ways and the worker. The HTTP path adds everything the gateway tier is: the
request over loopback, hypercorn, the front door (ids, keys, limits, access log), the schemas,
the plan and the response. Both paths send the job that the gateway's `plan()` makes of the
same body. The HTTP client is a raw keep-alive socket, so the client's own cost stays out.

Per request, what each path took outside the worker is its latency less the worker's own time
(from the `Done` message), which takes the worker's jitter out of the comparison; `added` is
the HTTP path's figure less the direct one's, median against median. Two figures sit beside
it: the gateway's own time from its Server-Timing header (the figure the 1 ms target is set
on), and `hop`, an HTTP round trip that does nothing (GET /health/live) after the gateway sat
idle as long as the worker computed: what two processes waking each other costs on this host,
which no gateway in its own process can go below. Prints a table and writes
bench/results/overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from bench.common import GOLDEN, table, write_json
from bench.serving import server_timing
from tests.conftest import Proc, free_port, spawn, wait_ready
from vdiff_api.dispatcher import Dispatcher, Result, Trace
from vdiff_api.requests import plan
from vdiff_api.schemas import CompletionRequest
from vdiff_common.protocol import Done, Error

MODEL = str(GOLDEN / "llada-tiny")


class HTTP:
    """One keep-alive HTTP/1.1 connection that sends a prepared request and reads the reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> HTTP:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, request: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").strip().split("\r\n")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
        }
        body = await self.reader.readexactly(int(headers["content-length"]))
        return int(lines[0].split()[1]), headers, json.loads(body)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def request_bytes(body: bytes, port: int) -> bytes:
    return (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (port, len(body), body)
    )


async def hop(http: HTTP, port: int, idle: float) -> float:
    """An HTTP round trip to the gateway that does nothing (GET /health/live), after the
    gateway sat idle for as long as a worker computes: the price of the hop itself."""
    await asyncio.sleep(idle)
    start = time.perf_counter()
    status, _, _ = await http.send(
        b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port
    )
    if status != 200:
        raise RuntimeError(f"/health/live answered {status}")
    return time.perf_counter() - start


@dataclass
class Sample:
    latency: float
    worker: float = 0.0  # the worker's own time, from its Done
    gateway: float | None = None  # the gateway's own share, from Server-Timing

    @property
    def outside(self) -> float:
        return self.latency - self.worker


async def direct(dispatcher: Dispatcher, body: bytes, i: int) -> tuple[Sample, int]:
    """One job sent straight to the worker, and how many tokens it answered."""
    info = dispatcher.models()["llada-tiny"]
    job = plan(msgspec.json.decode(body, type=CompletionRequest), f"direct-{i}", info).jobs[0]
    done: asyncio.Future[Result] = asyncio.get_running_loop().create_future()

    def deliver(msg: Result) -> None:
        if isinstance(msg, (Done, Error)) and not done.done():
            done.set_result(msg)

    start = time.perf_counter()
    dispatcher.dispatch(job, Trace(), deliver)
    msg = await done
    latency = time.perf_counter() - start
    if not isinstance(msg, Done):
        raise RuntimeError(f"direct request failed: {msg}")
    return Sample(latency, msg.worker_s), msg.completion_tokens


async def via_http(http: HTTP, request: bytes) -> tuple[Sample, int]:
    start = time.perf_counter()
    status, headers, reply = await http.send(request)
    latency = time.perf_counter() - start
    timing = headers.get("server-timing", "")
    worker = server_timing(timing, "worker")
    if status != 200 or worker is None:
        raise RuntimeError(f"HTTP request failed: {status} {reply}")
    return (
        Sample(latency, worker, server_timing(timing, "gateway")),
        reply["usage"]["completion_tokens"],
    )


async def measure(
    port: int,
    zmq_port: int,
    n: int,
    max_tokens: int,
) -> dict[str, list[Sample]]:
    """Per path, one sample per request; the direct and HTTP paths alternate which goes first,
    and each pair is followed by a hop after as long an idle gap as the worker took."""
    dispatcher = Dispatcher(f"tcp://127.0.0.1:{zmq_port}")
    await dispatcher.start()
    rows: dict[str, list[Sample]] = {"direct": [], "http": [], "hop": []}
    try:
        deadline = time.monotonic() + 60
        while "llada-tiny" not in dispatcher.models():
            if time.monotonic() > deadline:
                raise RuntimeError("the worker never registered with this script")
            await asyncio.sleep(0.05)
        http = await HTTP.connect(port)
        try:
            for i in range(n + WARMUP):
                body = json.dumps(
                    {
                        "model": "llada-tiny",
                        "prompt": f"What is {i % 50} + 1?",
                        "max_tokens": max_tokens,
                    }
                ).encode()
                got: dict[str, tuple[Sample, int]] = {}
                for path in ("direct", "http") if i % 2 == 0 else ("http", "direct"):
                    got[path] = (
                        await direct(dispatcher, body, i)
                        if path == "direct"
                        else await via_http(http, request_bytes(body, port))
                    )
                if got["direct"][1] != got["http"][1]:
                    raise RuntimeError(f"the paths answered differently: {got}")
                idle = Sample(await hop(http, port, got["direct"][0].worker))
                if i >= WARMUP:
                    for path, (sample, _) in got.items():
                        rows[path].append(sample)
                    rows["hop"].append(idle)
        finally:
            await http.close()
    finally:
        await dispatcher.stop()
    return rows


WARMUP = 10  # pairs that warm both paths up and are not counted


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def summarise(rows: dict[str, list[Sample]]) -> dict[str, Any]:
    table_rows = []
    for path, samples in rows.items():
        table_rows.append(
            {
                "path": path,
                "requests": len(samples),
                "latency p50 ms": pct([s.latency for s in samples], 50) * 1000,
                "latency p90 ms": pct([s.latency for s in samples], 90) * 1000,
                "worker p50 ms": pct([s.worker for s in samples], 50) * 1000,
                "outside worker p50 ms": pct([s.outside for s in samples], 50) * 1000,
                "outside worker p90 ms": pct([s.outside for s in samples], 90) * 1000,
            }
        )

    def ms(path: str, p: float) -> float:
        return pct([s.outside for s in rows[path]], p) * 1000

    gateway = [s.gateway for s in rows["http"] if s.gateway is not None]
    added = {f"p{p}": ms("http", p) - ms("direct", p) for p in (50, 90)}
    return {
        "rows": table_rows,
        "added_ms": added,
        "hop_ms": {f"p{p}": ms("hop", p) for p in (50, 90)},
        "gateway_ms": {f"p{p}": pct(gateway, p) * 1000 for p in (50, 90)},
        "latency_ratio_http_to_direct": statistics.median(s.latency for s in rows["http"])
        / statistics.median(s.latency for s in rows["direct"]),
        "target_ms": 1.0,
        "target_met": pct(gateway, 50) <= 1e-3,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=300, help="requests on each path")
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args(argv)
    port, zmq_port, bench_port = free_port(), free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs: list[Proc] = [
            spawn(
                "vdiff_api.cli",
                ["--port", str(port), "--zmq-bind", f"tcp://127.0.0.1:{zmq_port}"],
                Path(tmp) / "gateway.log",
            ),
            spawn(
                "vdiff_worker",
                [
                    "--model",
                    MODEL,
                    "--num-threads",
                    "1",
                    "--gateway",
                    f"tcp://127.0.0.1:{zmq_port}",
                    "--gateway",
                    f"tcp://127.0.0.1:{bench_port}",
                ],
                Path(tmp) / "worker.log",
            ),
        ]
        try:
            wait_ready(f"http://127.0.0.1:{port}", procs)
            rows = asyncio.run(measure(port, bench_port, args.requests, args.max_tokens))
        finally:
            for p in procs:
                p.stop()
    given = sys.argv[1:] if argv is None else argv
    report = {
        "command": " ".join(["python -m bench.overhead", *given]),
        "max_tokens": args.max_tokens,
        **summarise(rows),
    }
    print(table(report["rows"]))
    added, idle, gw = report["added_ms"], report["hop_ms"], report["gateway_ms"]
    print(
        f"gateway's own time (Server-Timing): p50 {gw['p50']:.3f} ms, p90 {gw['p90']:.3f} ms "
        f"(target <= 1 ms at p50: {'met' if report['target_met'] else 'not met'})"
    )
    print(
        f"added by the gateway tier (http less direct, outside the worker): p50 "
        f"{added['p50']:.3f} ms, p90 {added['p90']:.3f} ms; an HTTP round trip that does "
        f"nothing, after the same idle gap: p50 {idle['p50']:.3f} ms"
    )
    print(f"end-to-end latency ratio http/direct {report['latency_ratio_http_to_direct']:.3f}")
    print(f"wrote {write_json('overhead', report)}")
    return report


if __name__ == "__main__":
    main()

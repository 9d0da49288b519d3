"""Serving benchmark in the manner of vLLM's: load a running server, report latency and rates.

    .venv/bin/python -m bench.serving --base-url http://127.0.0.1:8000 --concurrency 8
    .venv/bin/python -m bench.serving --request-rate 20 --dataset prompts.jsonl --no-stream

Run from a repository checkout (bench is not in the wheel). Prompts come from the task suite
(vdiff_worker.tiny.tasks) or a JSONL file with a "prompt" field per line.
Fixed concurrency keeps N requests in flight; --request-rate sends a Poisson stream instead.
Prints a table, writes JSON (and PNG latency plots when matplotlib is installed).

Non-streaming responses carry the server's `Server-Timing`; from it the report splits what
serving adds around the worker's own time: `gateway` (request read to job out, result in to
response out), `transport` (sockets both ways and the worker's network side) and `added`
(the client's latency less the worker's time: all of the above plus HTTP and the client).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from vdiff_worker.tiny.tasks import suite


@dataclass
class Sample:
    ok: bool
    status: str  # "200", "429", "503", "timeout", "connect", ...
    latency: float
    ttfc: float | None = None
    completion_tokens: int = 0
    forward_passes: int = 0
    gateway_s: float | None = None  # from the Server-Timing header (non-streaming)
    transport_s: float | None = None
    worker_s: float | None = None


@dataclass
class Report:
    model: str
    mode: str
    requests: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    tokens_per_forward: float
    errors: dict[str, int]
    latency_s: dict[str, float]
    ttfc_s: dict[str, float] = field(default_factory=dict)
    gateway_overhead_s: dict[str, float] = field(default_factory=dict)
    transport_overhead_s: dict[str, float] = field(default_factory=dict)
    # Client-seen latency less the worker's time: everything serving adds, HTTP included.
    outside_worker_s: dict[str, float] = field(default_factory=dict)


def percentiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {}
    xs = sorted(xs)

    def pct(p: float) -> float:
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

    return {
        "mean": statistics.fmean(xs),
        "p50": pct(50),
        "p90": pct(90),
        "p95": pct(95),
        "p99": pct(99),
    }


def load_prompts(dataset: str | None, n: int, seed: int) -> list[str]:
    if dataset:
        lines = Path(dataset).read_text().splitlines()
        prompts = [json.loads(line)["prompt"] for line in lines if line.strip()]
    else:
        prompts = [t.prompt for t in suite(n_per_kind=max(1, n // 8 + 1), seed=seed)]
    random.Random(seed).shuffle(prompts)
    return [prompts[i % len(prompts)] for i in range(n)]


def server_timing(header: str, metric: str) -> float | None:
    """Seconds of `metric` in `server-timing: gateway;dur=MS, transport;dur=MS, ...`."""
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if name == metric and dur:
            return float(dur) / 1000
    return None


async def one(client: httpx.AsyncClient, url: str, body: dict, stream: bool) -> Sample:
    start = time.perf_counter()
    try:
        if not stream:
            r = await client.post(url, json=body)
            latency = time.perf_counter() - start
            if r.status_code != 200:
                return Sample(False, str(r.status_code), latency)
            usage = r.json()["usage"]
            timing = r.headers.get("server-timing", "")
            return Sample(
                True,
                "200",
                latency,
                None,
                usage["completion_tokens"],
                usage.get("forward_passes", 0),
                server_timing(timing, "gateway"),
                server_timing(timing, "transport"),
                server_timing(timing, "worker"),
            )
        ttfc, usage, errored = None, {}, False
        async with client.stream(
            "POST", url, json={**body, "stream": True, "stream_options": {"include_usage": True}}
        ) as r:
            if r.status_code != 200:
                await r.aread()
                return Sample(False, str(r.status_code), time.perf_counter() - start)
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    errored = True
                elif event.get("usage"):
                    usage = event["usage"]
                elif ttfc is None:
                    ttfc = time.perf_counter() - start
        latency = time.perf_counter() - start
        if errored:
            return Sample(False, "stream_error", latency, ttfc)
        return Sample(
            True,
            "200",
            latency,
            ttfc,
            usage.get("completion_tokens", 0),
            usage.get("forward_passes", 0),
        )
    except httpx.TimeoutException:
        return Sample(False, "timeout", time.perf_counter() - start)
    except httpx.HTTPError as err:
        return Sample(False, type(err).__name__, time.perf_counter() - start)


async def run(args: argparse.Namespace) -> Report:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.concurrency, 64))
    async with httpx.AsyncClient(
        base_url=args.base_url, headers=headers, limits=limits, timeout=args.timeout
    ) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        prompts = load_prompts(args.dataset, args.num_prompts, args.seed)
        extra = json.loads(args.extra_body) if args.extra_body else {}
        bodies = [
            {"model": model, "prompt": p, "max_tokens": args.max_tokens, **extra} for p in prompts
        ]
        url = "/v1/completions"
        start = time.perf_counter()
        if args.request_rate:
            rng = random.Random(args.seed)
            tasks = []
            for body in bodies:
                tasks.append(asyncio.create_task(one(client, url, body, args.stream)))
                await asyncio.sleep(rng.expovariate(args.request_rate))
            samples = list(await asyncio.gather(*tasks))
            mode = f"poisson {args.request_rate}/s"
        else:
            queue = list(reversed(bodies))
            samples = []

            async def lane() -> None:
                while queue:
                    samples.append(await one(client, url, queue.pop(), args.stream))

            await asyncio.gather(*(lane() for _ in range(args.concurrency)))
            mode = f"concurrency {args.concurrency}"
        duration = time.perf_counter() - start
    good = [s for s in samples if s.ok]
    errors: dict[str, int] = {}
    for s in samples:
        if not s.ok:
            errors[s.status] = errors.get(s.status, 0) + 1
    tokens = sum(s.completion_tokens for s in good)
    forwards = sum(s.forward_passes for s in good)
    return Report(
        model=model,
        mode=mode + (" stream" if args.stream else ""),
        requests=len(samples),
        duration_s=duration,
        requests_per_s=len(good) / duration,
        output_tokens_per_s=tokens / duration,
        tokens_per_forward=tokens / forwards if forwards else 0.0,
        errors=errors,
        latency_s=percentiles([s.latency for s in good]),
        ttfc_s=percentiles([s.ttfc for s in good if s.ttfc is not None]),
        gateway_overhead_s=percentiles([s.gateway_s for s in good if s.gateway_s is not None]),
        transport_overhead_s=percentiles(
            [s.transport_s for s in good if s.transport_s is not None]
        ),
        outside_worker_s=percentiles(
            [s.latency - s.worker_s for s in good if s.worker_s is not None]
        ),
    )


def show(report: Report) -> str:
    lines = [
        f"model {report.model}  {report.mode}  requests {report.requests}  "
        f"duration {report.duration_s:.2f}s",
        f"requests/s {report.requests_per_s:.2f}  output tokens/s "
        f"{report.output_tokens_per_s:.1f}  tokens/forward {report.tokens_per_forward:.2f}",
        f"errors {report.errors or 'none'}",
    ]
    for name, stats in (
        ("latency", report.latency_s),
        ("ttfc", report.ttfc_s),
        ("gateway", report.gateway_overhead_s),
        ("transport", report.transport_overhead_s),
        ("added", report.outside_worker_s),
    ):
        if stats:
            lines.append(
                f"{name:9s} " + "  ".join(f"{k} {v * 1000:.2f}ms" for k, v in stats.items())
            )
    return "\n".join(lines)


def plot(report: Report, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, stats in (("end-to-end", report.latency_s), ("first chunk", report.ttfc_s)):
        if stats:
            keys = ["p50", "p90", "p95", "p99"]
            ax.plot(keys, [stats[k] * 1000 for k in keys], marker="o", label=name)
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"{report.model}, {report.mode}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.serving",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--model", default=None, help="default: the first of /v1/models")
    ap.add_argument("--num-prompts", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument(
        "--request-rate",
        type=float,
        default=None,
        help="Poisson arrivals per second instead of fixed concurrency",
    )
    ap.add_argument("--dataset", default=None, help="JSONL file with a 'prompt' per line")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--extra-body", default=None, help="JSON merged into every request")
    ap.add_argument("--stream", default=True, action=argparse.BooleanOptionalAction)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="bench/results/serving.json")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    report = asyncio.run(run(args))
    print(show(report))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(asdict(report), indent=2))
    png = plot(report, out.with_suffix(".png"))
    print(f"wrote {out}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()

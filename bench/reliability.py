"""Reliability harness: load, faults and hostile input against real processes on loopback.

    .venv/bin/python -m bench.reliability            # full: 2,000 requests at concurrency 64
    .venv/bin/python -m bench.reliability --quick    # the shorter form CI runs

Every phase is bounded in requests and time and stops by itself. Writes
bench/results/reliability.json and the table in bench/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import httpx
import msgspec
import zmq

from bench import overhead, serving
from bench.common import GOLDEN, RESULTS, ROOT
from bench.serving import Sample, one
from tests.conftest import Proc, free_port, spawn, wait_ready
from vdiff_common import protocol

MODEL = str(GOLDEN / "llada-tiny")
PROMPT = "What is 24 + 1?"
INTENTIONAL = {"200", "429", "503"}


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


class Stack:
    """A gateway plus workers, each its own process, on free loopback ports."""

    def __init__(self, tmp: Path, workers: int = 1, worker_flags: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.worker_flags = worker_flags
        tmp.mkdir(parents=True, exist_ok=True)
        self.port, self.zport = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.zmq = f"tcp://127.0.0.1:{self.zport}"
        self.gateway = self._gateway()
        self.workers = [self.worker(f"w{i}") for i in range(workers)]
        wait_ready(self.base, [self.gateway, *self.workers])

    def _gateway(self) -> Proc:
        proc = spawn(
            "vdiff_api.cli",
            [
                "--port",
                str(self.port),
                "--zmq-bind",
                self.zmq,
                "--heartbeat-interval",
                "0.3",
                "--drain-timeout",
                "20",
            ],
            self.tmp / f"gateway-{time.monotonic_ns()}.log",
        )
        wait_ready(self.base, [proc], path="/health/live")
        return proc

    def worker(self, name: str) -> Proc:
        return spawn(
            "vdiff_worker",
            [
                "--model",
                MODEL,
                "--gateway",
                self.zmq,
                "--worker-id",
                name,
                "--num-threads",
                "1",
                "--heartbeat-interval",
                "0.3",
                "--max-queue-size",
                "4096",
                *self.worker_flags,
            ],
            self.tmp / f"{name}-{time.monotonic_ns()}.log",
        )

    def restart_gateway(self) -> None:
        self.gateway.stop(signal.SIGKILL)
        self.gateway = self._gateway()

    def close(self) -> None:
        for p in [self.gateway, *self.workers]:
            p.stop(signal.SIGKILL, timeout=5)


async def drive(
    base: str,
    n: int,
    concurrency: int,
    stream: bool,
    on_progress: Callable[[int], None] | None = None,
    timeout: float = 120.0,
    stop: threading.Event | None = None,
) -> list[Sample]:
    """Send up to `n` requests from `concurrency` lanes (until `stop` is set, if given)."""
    body = {"model": "llada-tiny", "prompt": PROMPT, "max_tokens": 8, "block_length": 8}
    samples: list[Sample] = []
    remaining = n
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as client:

        async def lane() -> None:
            nonlocal remaining
            while remaining > 0 and not (stop is not None and stop.is_set()):
                remaining -= 1
                samples.append(await one(client, "/v1/completions", body, stream))
                if on_progress is not None:
                    on_progress(len(samples))

        await asyncio.gather(*(lane() for _ in range(concurrency)))
    return samples


def load_phase(tmp: Path, n: int, concurrency: int) -> dict[str, Any]:
    stack = Stack(tmp / "load")
    try:
        marks: list[tuple[int, int]] = []
        quarter = max(1, n // 4)

        def progress(done: int) -> None:
            if done % quarter == 0:
                marks.append((rss(stack.gateway.popen.pid), rss(stack.workers[0].popen.pid)))

        t0 = time.perf_counter()
        samples = asyncio.run(drive(stack.base, n, concurrency, stream=False, on_progress=progress))
        seconds = time.perf_counter() - t0
    finally:
        stack.close()
    codes = Counter(s.status for s in samples)
    first, last = marks[0], marks[-1]
    growth = [(b - a) / a * 100 for a, b in zip(first, last)]
    return {
        "requests": n,
        "concurrency": concurrency,
        "answered": len(samples),
        "seconds": round(seconds, 2),
        "requests_per_s": round(n / seconds, 1),
        "codes": dict(codes),
        "gateway_rss_growth_pct": round(growth[0], 2),
        "worker_rss_growth_pct": round(growth[1], 2),
        "ok": len(samples) == n and set(codes) <= INTENTIONAL and max(growth) < 5.0,
    }


class Background:
    """Client load in a thread until stopped (or `n` requests), so faults land under load."""

    def __init__(self, base: str, n: int, concurrency: int, stream: bool) -> None:
        self.samples: list[Sample] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=lambda: self.samples.extend(
                asyncio.run(drive(base, n, concurrency, stream, timeout=60.0, stop=self.stop))
            )
        )
        self.thread.start()

    def finish(self, after: float = 1.0) -> bool:
        """Let the load run on `after` seconds, stop it; True if it ended in time."""
        time.sleep(after)
        self.stop.set()
        self.thread.join(timeout=120)
        return not self.thread.is_alive()


def fault_phase(tmp: Path, n: int) -> list[dict[str, Any]]:
    rows = []

    def scenario(
        name: str,
        expect: str,
        act: Callable[[Stack], None],
        workers: int,
        allowed: set[str],
        stream: bool = True,
    ) -> None:
        stack = Stack(tmp / name.replace(" ", "-"), workers)
        try:
            load = Background(stack.base, n, 8, stream)
            samples = load.samples
            time.sleep(1.0)
            t0 = time.perf_counter()
            act(stack)
            hung = not load.finish()
            after = httpx.post(
                stack.base + "/v1/completions",
                timeout=60,
                json={"model": "llada-tiny", "prompt": PROMPT, "max_tokens": 8},
            ).status_code
        except httpx.HTTPError as err:
            hung, after, t0 = False, 0, time.perf_counter()
            samples = [Sample(False, type(err).__name__, 0.0)]
        finally:
            stack.close()
        codes = Counter(s.status for s in samples)
        rows.append(
            {
                "scenario": name,
                "expected": expect,
                "codes": dict(codes),
                "hung": hung,
                "serves_after": after,
                "seconds": round(time.perf_counter() - t0, 2),
                "ok": not hung and after == 200 and set(codes) <= allowed,
            }
        )

    def kill_worker(s: Stack) -> None:
        s.workers[0].stop(signal.SIGKILL)

    def term_worker(s: Stack) -> None:
        assert s.workers[0].stop(signal.SIGTERM) == 0
        s.workers[0] = s.worker("w0-again")
        wait_ready(s.base, [s.gateway])

    def restart_gateway(s: Stack) -> None:
        s.restart_gateway()
        wait_ready(s.base, [s.gateway, *s.workers], timeout=30)

    scenario(
        "SIGKILL one of two workers",
        "done or a clear 503/stream error",
        kill_worker,
        2,
        INTENTIONAL | {"stream_error"},
    )
    scenario("SIGTERM one of two workers", "every request 200", term_worker, 2, {"200"})
    scenario(
        "SIGKILL + restart gateway",
        "connection errors while down, then 200",
        restart_gateway,
        1,
        INTENTIONAL
        | {"stream_error", "RemoteProtocolError", "ConnectError", "ReadError", "WriteError"}
        | {"ConnectTimeout"},
    )
    return rows


def gateway_sigterm(tmp: Path) -> dict[str, Any]:
    """SIGTERM to the gateway under load: in-flight requests finish, then exit code 0."""
    stack = Stack(tmp / "gateway-term")
    try:
        load = Background(stack.base, 100_000, 8, stream=True)
        samples = load.samples
        time.sleep(1.0)
        code = stack.gateway.stop(signal.SIGTERM, timeout=60)
        load.finish(after=0.0)
    finally:
        stack.close()
    codes = Counter(s.status for s in samples)
    # After the drain the listener closes: later requests cannot connect, and a keep-alive
    # connection closed as a new request was sent on it fails to write or read (never an
    # in-flight one).
    ok_codes = {"200", "503", "ConnectError", "RemoteProtocolError", "ReadError", "WriteError"}
    return {
        "scenario": "SIGTERM gateway",
        "expected": "in-flight finish, exit 0",
        "codes": dict(codes),
        "exit_code": code,
        "ok": code == 0 and set(codes) <= ok_codes and codes["200"] > 0,
    }


def rejected_frames(base: str) -> float:
    """The gateway's count of ZeroMQ frames it refused to decode."""
    text = httpx.get(base + "/metrics").text
    found = re.search(r"^vdiff_rejected_frames_total (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def send_hostile_frames(address: str) -> tuple[int, protocol.Message | None]:
    """Garbage, truncated, wrongly typed, unknown, multi-part and large frames, then a Register
    of a future protocol version, then a frame over the size limit, to a gateway's ZeroMQ
    port. Returns how many the gateway should count as refused and its answer to the Register
    (the frame over the limit makes ZeroMQ drop the sender before the gateway sees it)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"intruder")
    sock.connect(address)
    frames = [
        b"",
        b"\xff\x00garbage",
        msgspec.msgpack.encode({"type": "Nope"}),
        protocol.encode(protocol.Heartbeat("x"))[:-2],  # truncated
        msgspec.msgpack.encode({"type": "Chunk", "request_id": 1}),  # wrong types
        b"x" * 2_000_000,
    ]
    try:
        for f in frames:
            sock.send(f)
        sock.send_multipart([b"two", b"parts"])
        sock.send(
            protocol.encode(
                protocol.Register(
                    version=protocol.PROTOCOL_VERSION + 1,
                    worker_id="future",
                    capacity=1,
                    models=[protocol.ModelInfo("evil", 10)],
                )
            )
        )
        answer = protocol.decode(sock.recv()) if sock.poll(5000) else None
        sock.send(b"y" * (65 * 1024 * 1024))
    finally:
        sock.close()
        ctx.term()
    return len(frames) + 1, answer


def refused_frames(base: str, address: str) -> tuple[int, float, protocol.Message | None]:
    """send_hostile_frames to the gateway at `address`, then wait (up to 5 s) for its count:
    (frames it should refuse, frames it counted as refused, its answer to the Register)."""
    before = rejected_frames(base)
    expected, answer = send_hostile_frames(address)
    deadline = time.monotonic() + 5
    while rejected_frames(base) - before < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return expected, rejected_frames(base) - before, answer


def frames_case(stack: Stack) -> dict[str, Any]:
    expected, counted, answer = refused_frames(stack.base, stack.zmq)
    refused = isinstance(answer, protocol.Welcome) and not answer.accepted
    workers = [w["id"] for w in httpx.get(stack.base + "/health").json()["workers"]]
    return {
        "case": "ZeroMQ port: garbage, truncated, wrong-type, oversized, wrong-version frames",
        "status": f"{counted:.0f} of {expected} counted, version "
        f"{'refused' if refused else 'NOT refused'}",
        "ok": counted == expected and refused and "future" not in workers,
    }


def hostile_phase(tmp: Path) -> list[dict[str, Any]]:
    stack = Stack(tmp / "hostile")
    url = stack.base + "/v1/completions"
    cases: list[tuple[str, bytes, set[int]]] = [
        ("oversized body", b'{"prompt": "' + b"a" * (2 << 20) + b'"}', {413}),
        ("deeply nested JSON", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {400}),
        ("invalid UTF-8", b'{"model": "llada-tiny", "prompt": "\xff\xfe"}', {400}),
        ("huge n", b'{"model": "llada-tiny", "prompt": "x", "n": 100000}', {400}),
        ("huge max_tokens", b'{"model": "llada-tiny", "prompt": "x", "max_tokens": 1e12}', {400}),
        ("negative max_tokens", b'{"model": "llada-tiny", "prompt": "x", "max_tokens": -5}', {400}),
        ("NaN temperature", b'{"model": "llada-tiny", "prompt": "x", "temperature": NaN}', {400}),
        ("not JSON", b"\x00\x01garbage", {400}),
    ]
    rows = []
    try:
        for name, body, want in cases:
            r = httpx.post(
                url, content=body, timeout=60, headers={"content-type": "application/json"}
            )
            rows.append(
                {
                    "case": name,
                    "status": r.status_code,
                    "ok": r.status_code in want and "error" in r.json(),
                }
            )
        rows.append(frames_case(stack))
        alive = httpx.post(
            url, timeout=60, json={"model": "llada-tiny", "prompt": PROMPT, "max_tokens": 8}
        ).status_code
        rows.append({"case": "still serving afterwards", "status": alive, "ok": alive == 200})
    finally:
        stack.close()
    return rows


SECURITY = (
    "tests/e2e/test_gateway_auth.py",
    "tests/e2e/test_gateway_curve.py",
    "tests/common/test_no_unpickling.py",
)


def security_phase(tmp: Path) -> list[dict[str, Any]]:
    """The security tests (API keys on every /v1 route, CURVE admission, no unpickling, no key
    in the logs), run here so that one report holds every figure; `make test` runs them too."""
    report = tmp / "security.xml"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
            *SECURITY,
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=900,
    )
    rows = []
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        failed = any(child.tag in ("failure", "error", "skipped") for child in case)
        rows.append(
            {
                "case": f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}",
                "ok": not failed,
            }
        )
    return rows or [{"case": "security tests", "ok": False}]


def schema_phase(tmp: Path, examples: int) -> dict[str, Any]:
    """schemathesis against /openapi.json: no server error, no response outside the schema.

    Generated requests may ask for long generations; --request-timeout keeps each short."""
    stack = Stack(tmp / "schema", worker_flags=("--request-timeout", "5"))
    tool = Path(sys.executable).parent / "schemathesis"
    try:
        out = subprocess.run(
            [
                str(tool),
                "run",
                stack.base + "/openapi.json",
                "--max-examples",
                str(examples),
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
                "-w",
                "2",
                "--exclude-path-regex",
                "^/docs",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        alive = httpx.post(
            stack.base + "/v1/completions",
            timeout=60,
            json={"model": "llada-tiny", "prompt": PROMPT, "max_tokens": 8},
        ).status_code
    finally:
        stack.close()
    found = re.search(r"(\d+) generated, (.*)", out.stdout)
    ok = out.returncode == 0 and alive == 200
    row = {
        "case": "schemathesis",
        "status": alive,
        "summary": found.group(0).strip() if found else out.stdout[-300:],
        "generated": int(found.group(1)) if found else 0,
        "ok": ok,
    }
    if not ok:  # what it found, and the seed that reproduces it
        row["detail"] = out.stdout[-3000:] + out.stderr[-1000:]
    return row


def overhead_phase(tmp: Path, n: int) -> dict[str, Any]:
    """What serving adds around the worker's time, one request at a time (bench.serving).
    Reported against the 1 ms target, not gated on: a timing is a figure, not a check."""
    stack = Stack(tmp / "overhead")
    out = tmp / "overhead.json"
    command = [
        "--base-url",
        stack.base,
        "--no-stream",
        "--concurrency",
        "1",
        "--max-tokens",
        "8",
        "--num-prompts",
        str(n),
        "--output",
        str(out),
    ]
    try:
        serving.main(command)
    finally:
        stack.close()
    report = json.loads(out.read_text())
    ms = {
        name: {k: round(report[key][k] * 1000, 3) for k in ("p50", "p90")}
        for name, key in (
            ("gateway", "gateway_overhead_s"),
            ("transport", "transport_overhead_s"),
            ("added", "outside_worker_s"),
        )
    }
    tier = overhead.main(["--requests", str(n)])
    return {
        "command": "python -m bench.serving " + " ".join(command[2:-2]),
        "requests": n,
        "errors": report["errors"],
        "ms": ms,
        "tier": tier,
        "target_met": ms["gateway"]["p50"] <= 1.0,
        "ok": not report["errors"],
    }


def markdown(report: dict[str, Any], command: str) -> str:
    load = report["load"]
    lines = [
        "# Reliability",
        "",
        f"Last run: `{command}` ({report['date']}).",
        "",
        "## Load",
        "",
        "| requests | concurrency | seconds | req/s | status codes | "
        "gateway RSS growth | worker RSS growth | ok |",
        "|---|---|---|---|---|---|---|---|",
        f"| {load['requests']} | {load['concurrency']} | {load['seconds']} | "
        f"{load['requests_per_s']} | {load['codes']} | {load['gateway_rss_growth_pct']}% | "
        f"{load['worker_rss_growth_pct']}% | {load['ok']} |",
        "",
        "## Faults",
        "",
        "| scenario | expected | outcomes | ok |",
        "|---|---|---|---|",
    ]
    for row in report["faults"]:
        lines.append(f"| {row['scenario']} | {row['expected']} | {row['codes']} | {row['ok']} |")
    lines += ["", "## Hostile input", "", "| case | status | ok |", "|---|---|---|"]
    for row in report["hostile"]:
        lines.append(f"| {row['case']} | {row['status']} | {row['ok']} |")
    lines += [
        "",
        "## Security",
        "",
        f"`pytest {' '.join(SECURITY)}`",
        "",
        "| test | ok |",
        "|---|---|",
    ]
    for row in report["security"]:
        lines.append(f"| {row['case']} | {row['ok']} |")
    schema = report["schema"]
    lines += [
        "",
        "## Schema fuzzing",
        "",
        f"schemathesis: {schema['summary']} "
        f"(worker serving afterwards: {schema['status']}, ok: {schema['ok']})",
    ]
    over = report["overhead"]
    lines += [
        "",
        "## Gateway overhead",
        "",
        f"`{over['command']}` against a gateway and one LLaDA-tiny worker "
        f"({over['requests']} requests; target: gateway p50 <= 1 ms, met: "
        f"{over['target_met']}). Gateway: request read to job out plus result in to "
        "response out; transport: the rest of the round trip outside the worker; "
        "added: the client's latency less the worker's time (HTTP and the client "
        "included).",
        "",
        "| share | p50 ms | p90 ms |",
        "|---|---|---|",
    ]
    for name, row in over["ms"].items():
        lines.append(f"| {name} | {row['p50']} | {row['p90']} |")
    tier = over["tier"]
    lines += [
        "",
        f"`{tier['command']}`: the same worker answers each request directly over "
        "ZeroMQ and through the gateway's HTTP API, alternating; *outside worker* is "
        "latency less the worker's own time; *hop* is a GET /health/live after the gateway "
        "sat idle as long as the worker computed (raw-socket client, no HTTP library).",
        "",
        "| path | requests | latency p50 ms | outside worker p50 ms | outside worker p90 ms |",
        "|---|---|---|---|---|",
    ]
    for row in tier["rows"]:
        lines.append(
            f"| {row['path']} | {row['requests']} | {row['latency p50 ms']:.3f} | "
            f"{row['outside worker p50 ms']:.3f} | {row['outside worker p90 ms']:.3f} |"
        )
    lines += [
        "",
        f"Added by the gateway tier (http less direct): p50 "
        f"{tier['added_ms']['p50']:.3f} ms, p90 {tier['added_ms']['p90']:.3f} ms; of it "
        f"the gateway's own time p50 {tier['gateway_ms']['p50']:.3f} ms, and a hop that "
        f"does nothing costs p50 {tier['hop_ms']['p50']:.3f} ms.",
    ]
    return "\n".join(lines) + "\n"


def failures(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [report["load"], *report["faults"], *report["hostile"], report["schema"]]
    rows += [*report.get("security", []), report["overhead"]]
    return [row for row in rows if not row["ok"]]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="the short form CI runs")
    args = ap.parse_args()
    n, conc, fault_n = (200, 16, 2000) if args.quick else (2000, 64, 20_000)
    examples = 20 if args.quick else 100
    with tempfile.TemporaryDirectory() as tmp:
        report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        report["load"] = load_phase(Path(tmp), n, conc)
        print("load", json.dumps(report["load"]))
        report["faults"] = [*fault_phase(Path(tmp), fault_n), gateway_sigterm(Path(tmp))]
        for row in report["faults"]:
            print("fault", json.dumps(row))
        report["hostile"] = hostile_phase(Path(tmp))
        for row in report["hostile"]:
            print("hostile", json.dumps(row))
        if not args.quick:  # in CI, `make test` runs these tests already
            report["security"] = security_phase(Path(tmp))
            for row in report["security"]:
                print("security", json.dumps(row))
        report["schema"] = schema_phase(Path(tmp), examples)
        print("schema", json.dumps(report["schema"]))
        report["overhead"] = overhead_phase(Path(tmp), 50 if args.quick else 300)
        print("overhead", json.dumps(report["overhead"]))
    report["ok"] = (
        report["load"]["ok"]
        and all(r["ok"] for r in report["faults"])
        and all(r["ok"] for r in report["hostile"])
        and report["schema"]["ok"]
        and all(r["ok"] for r in report.get("security", []))
        and report["overhead"]["ok"]
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reliability.json").write_text(json.dumps(report, indent=2))
    if not args.quick:
        (ROOT / "bench" / "reliability.md").write_text(
            markdown(report, "python -m bench.reliability")
        )
    # Failing rows last, so that a log cut to its tail still says which check failed.
    for row in failures(report):
        print("failed", json.dumps(row))
    print("reliability", "PASS" if report["ok"] else "FAIL")
    raise SystemExit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()

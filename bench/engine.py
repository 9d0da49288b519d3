"""The engine under concurrency: every decoding mode through the real server, against a bound.

    .venv/bin/python bench/engine.py [--max-tokens 128] [--requests 2] [--quick]
                                     [--only llada-tiny/threshold+dual,...] [--levels 1,4,16]

One all-in-one ``vdiff`` per checkpoint (one worker, ``--max-num-seqs 16``, ``--num-threads
1``): llada-tiny, dream-tiny (with ``--enable-apd --apd-verifier ar-tiny``, which only adds the
``apd`` mode; the other Dream modes never touch the verifier), ar-tiny (the autoregressive
fallback) and llada2-tiny (LLaDA2.0's rule with and without the block cache, LLaDA2.1's editing
rule with it; threshold 0.95, the model's default). Every mode runs at concurrency 1, 4 and 16
(APD also at 8): C client threads each send ``--requests`` completions back to back, prompts
being the token ids of the golden cases, temperature 0, ``eos_early_stop: false`` (every request
decodes its whole canvas, so each does the same work), ``block_length`` 32 where the mode has
blocks (Dream's reference, APD and the autoregressive fallback have none, and refuse the field).

Per (mode, C):

- ``tok/s``: canvas tokens (``max_tokens`` per request: what was decoded) over wall time;
  ``compl tok/s`` counts ``usage.completion_tokens`` instead, which stops at the first EOS the
  random-weight model happens to commit.
- ``lat s``: the requests' mean latency.
- ``rows/call``: the worker's ``model_rows`` over ``model_calls`` (``/v1/engine/stats``,
  before and after the level): how many sequences one call into the model carried on average.
  ``calls/req`` is ``model_calls`` per request; ``pass/req`` the passes one request makes
  (from the replay below), so at C=1 the two agree, and perfect batching would make calls/req
  pass/req over C. ``tok/pass``: the tokens one of those passes runs over (a cached block
  pass: the block; an uncached one: the whole window).
- ``speedup``: tok/s over the same mode's C=1 (the JSON's ``bound_speedup``: the bound's,
  what batching alone can buy on this machine).
- ``bound tok/s`` and ``of bound``: what the bare model could do, and served tok/s over it.

The bound: C sequences decoded in perfect lockstep, every pass of theirs one model call of C
rows, and nothing but the model's forward costing time (no scheduler, no sampling, no
transport). Its passes are those of the real strategy: each mode's requests are replayed in
this process, one at a time through the worker's own Admission and Runner, and every pass is
recorded as (model, width, logit span). Each distinct pass is then timed as a bare forward
(``torch.no_grad``, ``torch.set_num_threads(1)``, best of several) at ``[C, width]`` with the
logits of the same span. The bound for C is ``C * max_tokens / sum of t(pass, C)`` over one
request's passes, averaged over the prompts that level sent. Cached passes (a 32-token block of
the dual cache, the block-and-after of the prefix cache, one token of the AR decode, APD's
windows) are timed as plain forwards over their own width: the approximation leaves out their
attention to the cached keys (prompt + canvas), so for them the bound is slightly optimistic,
as a bound should be. It is timed after the served run, not during it: on a shared machine a
level can come out a little above it.

Targets are printed against the figures: llada-tiny threshold+dual at C=16 at least 1.4x its
C=1 with at least 8 rows per model call, and APD on dream-tiny at least 4 rows per call at C=8.

Writes bench/results/engine.json and, with matplotlib, engine.png (tok/s against concurrency,
one line per mode, at the levels every mode has).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from loguru import logger
from torch import nn

from bench.common import GOLDEN, Server, plot, start_allinone, table, write_json

CASES = GOLDEN / "cases"
BLOCK = 32
LEVELS = (1, 4, 16)
APD_LEVELS = (1, 4, 8, 16)
MAX_NUM_SEQS = 16
HEARTBEAT = 0.5  # the workers' load (with the model counters) reaches the gateway this often
STEPS = "max_tokens"  # a field value the mode's max_tokens replaces

Pass = tuple[str, int, int, int]  # (model role, width, rows, logit span length)


@dataclass(frozen=True)
class Mode:
    label: str
    fields: dict[str, Any]  # over the base request; None drops a base field
    levels: tuple[int, ...] = LEVELS


@dataclass(frozen=True)
class Group:
    """One server: a checkpoint, its prompts and the modes run against it."""

    model: str  # a checkpoint directory of GOLDEN, also the served name
    cases: str
    modes: tuple[Mode, ...]
    verifier: str | None = None  # APD's verifier checkpoint in GOLDEN
    path: Path | None = None  # the checkpoint elsewhere (bench.wide's generated ones)
    flags: tuple[str, ...] = ()  # more worker flags (bench.wide's acceleration options)
    accel: dict[str, Any] | None = None  # those flags as vdiff_worker.accel.Options fields

    @property
    def checkpoint(self) -> str:
        return str(self.path or GOLDEN / self.model)


NO_BLOCKS = {"block_length": None}
GROUPS = (
    Group(
        "llada-tiny",
        "shared_llada.json",
        (
            Mode("reference", {"decoding": "reference", "diffusion_steps": STEPS}),
            Mode(
                "reference+dual",
                {"decoding": "reference", "diffusion_steps": STEPS, "cache": "dual"},
            ),
            Mode("threshold", {"decoding": "threshold", "threshold": 0.9, "cache": "none"}),
            Mode(
                "threshold+prefix", {"decoding": "threshold", "threshold": 0.9, "cache": "prefix"}
            ),
            Mode("threshold+dual", {"decoding": "threshold", "threshold": 0.9, "cache": "dual"}),
            Mode("factor+dual", {"decoding": "factor", "factor": 1.0, "cache": "dual"}),
        ),
    ),
    Group(
        "dream-tiny",
        "shared_dream.json",
        (
            Mode("reference", {"decoding": "reference", "diffusion_steps": STEPS, **NO_BLOCKS}),
            Mode("threshold+dual", {"decoding": "threshold", "threshold": 0.9, "cache": "dual"}),
            Mode(
                "apd",
                {"decoding": "apd", "apd_kv_window": 16, "apd_max_lookahead": 16, **NO_BLOCKS},
                APD_LEVELS,
            ),
        ),
        verifier="ar-tiny",
    ),
    Group(
        "ar-tiny", "shared_dream.json", (Mode("reference", {"decoding": "reference", **NO_BLOCKS}),)
    ),
    Group(
        "llada2-tiny",
        "shared_llada2.json",
        (
            Mode("reference", {"decoding": "reference", "cache": "none"}),
            Mode("reference+block cache", {"decoding": "reference", "cache": "prefix"}),
            Mode("editing+block cache", {"decoding": "editing", "cache": "prefix"}),
        ),
    ),
)


def prompts(cases: str) -> list[list[int]]:
    """The distinct prompt token ids of a golden case file's ``generate`` entries."""
    seen: dict[tuple[int, ...], None] = {}
    for case in json.loads((CASES / cases).read_text())["generate"]:
        if "prompt_ids" in case:
            seen.setdefault(tuple(case["prompt_ids"]), None)
    return [list(p) for p in seen]


def request_body(mode: Mode, max_tokens: int) -> dict[str, Any]:
    base: dict[str, Any] = {
        "max_tokens": max_tokens,
        "block_length": min(BLOCK, max_tokens),
        "temperature": 0.0,
        "eos_early_stop": False,
        "return_token_ids": True,
    }
    merged = {**base, **{k: (max_tokens if v == STEPS else v) for k, v in mode.fields.items()}}
    return {k: v for k, v in merged.items() if v is not None}


def sent_prompts(n_prompts: int, concurrency: int, per_client: int) -> list[int]:
    """The prompt index of each request a level sends (client k's j-th request)."""
    return [(k * per_client + j) % n_prompts for k in range(concurrency) for j in range(per_client)]


# ---- the served side -------------------------------------------------------------------------
class RequestFailed(RuntimeError):
    pass


def counters(server: Server) -> tuple[int, int]:
    """(model_calls, model_rows) of all workers, once a heartbeat sent after the last request
    has carried them to the gateway."""
    time.sleep(2 * HEARTBEAT)
    workers = httpx.get(server.url + "/engine/stats", timeout=30).json()["workers"]
    return (sum(int(w["model_calls"]) for w in workers), sum(int(w["model_rows"]) for w in workers))


def run_level(
    server: Server,
    model: str,
    body: dict[str, Any],
    pool: list[list[int]],
    concurrency: int,
    per_client: int,
    before: tuple[int, int],
) -> dict[str, Any]:
    """One level; ``before`` is the counters as it starts (nothing else runs meanwhile)."""
    order = sent_prompts(len(pool), concurrency, per_client)

    def client(k: int) -> list[tuple[float, int]]:
        done = []
        with httpx.Client(timeout=900) as http:
            for j in range(per_client):
                prompt = pool[order[k * per_client + j]]
                t0 = time.perf_counter()
                r = http.post(
                    server.url + "/completions", json={**body, "model": model, "prompt": prompt}
                )
                if r.status_code != 200:
                    raise RequestFailed(f"HTTP {r.status_code}: {r.text[:300]}")
                done.append((time.perf_counter() - t0, int(r.json()["usage"]["completion_tokens"])))
        return done

    calls0, rows0 = before
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as threads:
        results = [x for part in threads.map(client, range(concurrency)) for x in part]
    wall = time.perf_counter() - t0
    calls1, rows1 = counters(server)
    n = len(results)
    tokens = n * int(body["max_tokens"])
    calls = calls1 - calls0
    return {
        "concurrency": concurrency,
        "requests": n,
        "tokens": tokens,
        "completion_tokens": sum(c for _, c in results),
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "completion_tokens_per_s": sum(c for _, c in results) / wall,
        "latency_mean_s": statistics.fmean(t for t, _ in results),
        "model_calls": calls,
        "model_rows": rows1 - rows0,
        "rows_per_call": (rows1 - rows0) / calls if calls else math.nan,
        "calls_per_request": calls / n,
        "counters": (calls1, rows1),
    }


def serve_group(
    tmp: Path,
    group: Group,
    modes: list[Mode],
    pool: list[list[int]],
    max_tokens: int,
    per_client: int,
    levels: tuple[int, ...] | None,
) -> dict[str, dict[str, Any]]:
    flags = [
        "--model",
        group.checkpoint,
        "--served-model-name",
        group.model,
        "--max-num-seqs",
        str(MAX_NUM_SEQS),
        "--heartbeat-interval",
        str(HEARTBEAT),
        "--num-threads",
        "1",
    ]
    if group.verifier:
        flags += ["--enable-apd", "--apd-verifier", str(GOLDEN / group.verifier)]
    flags += group.flags
    server = start_allinone(tmp, *flags)
    out: dict[str, dict[str, Any]] = {}
    try:
        for mode in modes:
            body = request_body(mode, max_tokens)
            res: dict[str, Any] = {
                "request": {k: v for k, v in body.items() if k != "return_token_ids"},
                "levels": [],
            }
            out[mode.label] = res
            try:
                # A warm-up request; its closing read opens the first level.
                now = run_level(server, group.model, body, pool, 1, 1, (0, 0))["counters"]
                for c in levels or mode.levels:
                    lv = run_level(server, group.model, body, pool, c, per_client, now)
                    now = lv.pop("counters")
                    res["levels"].append(lv)
                    print(
                        f"  {group.model} {mode.label} C={c}: "
                        f"{res['levels'][-1]['tokens_per_s']:.1f} tok/s",
                        flush=True,
                    )
            except RequestFailed as err:
                res["error"] = str(err)
                print(f"  {group.model} {mode.label}: {err}", flush=True)
    finally:
        server.procs[0].stop()
    return out


# ---- the bound -------------------------------------------------------------------------------
def trace(
    loaded: Any, models: dict[str, nn.Module], body: dict[str, Any], prompt: list[int]
) -> list[Pass]:
    """The passes one request makes, replayed alone through the worker's own admission and
    runner (the same strategy code, the same settings resolution as the server)."""
    from vdiff_common.protocol import Generate, SamplingParams
    from vdiff_worker.admission import Admission, Defaults
    from vdiff_worker.decoding.base import Fetch, Forward
    from vdiff_worker.metrics import WorkerMetrics
    from vdiff_worker.runner import Call, Runner

    fields = set(SamplingParams.__struct_fields__)
    params = SamplingParams(**{k: v for k, v in body.items() if k in fields})
    job = Generate(
        request_id="trace", model=loaded.name, prompt_ids=prompt, params=params, stream=False
    )
    admission = Admission(loaded, Defaults(), frozenset(models))
    runner = Runner(
        models,
        slots=1,
        max_len=loaded.max_model_len,
        metrics=WorkerMetrics(loaded.name, "bench-trace"),
    )
    (seq,) = admission.sequences(job, time.perf_counter())
    slots = runner.acquire(seq.strategy.cached_models()) or {}
    passes: list[Pass] = []
    with torch.no_grad():
        while not seq.done:
            f = seq.pending
            assert isinstance(f, Forward)
            passes.append((f.model, int(f.input_ids.shape[1]), int(f.input_ids.shape[0]), f.reads))
            seq.advance(runner.run([Call(f, slots.get(f.model))])[0])
            while isinstance(seq.pending, Fetch):
                seq.advance(runner.fetch([seq.pending])[0])
            seq.collect()
    return passes


class Timer:
    """Bare forwards, timed once per (pass shape, concurrency) and remembered."""

    def __init__(self, models: dict[str, nn.Module], vocab: int) -> None:
        self.models = models
        self.vocab = vocab
        self.seen: dict[tuple[Pass, int], float] = {}

    def __call__(self, p: Pass, concurrency: int) -> float:
        key = (p, concurrency)
        if key not in self.seen:
            model, width, rows, span = p
            n = rows * concurrency
            module = self.models[model]
            device = next(module.parameters()).device
            ids = torch.randint(self.vocab, (n, width), device=device)
            # Each row's last `span` positions, as the runner asks for them.
            heads = torch.arange(width - span, width).expand(n, span).to(device)
            with torch.no_grad():
                module(ids, heads=heads)  # warm-up
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times: list[float] = []
                while len(times) < 3 or (len(times) < 20 and sum(times) < 0.05):
                    t0 = time.perf_counter()
                    module(ids, heads=heads)
                    if device.type == "cuda":  # the kernels' time, not their launch
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
            self.seen[key] = min(times)
        return self.seen[key]


def bound_group(
    group: Group, served: dict[str, dict[str, Any]], pool: list[list[int]], per_client: int
) -> None:
    """Trace every served mode, time its passes bare, and put the bound beside each level."""
    from vdiff_worker import accel
    from vdiff_worker.decoding.base import ParamError
    from vdiff_worker.models import load_model

    torch.set_num_threads(1)
    logger.disable("vdiff_worker")  # the replay's cache-slot notices, once per prompt
    # Where and how the worker holds the model (its --device auto, --dtype auto, the
    # group's acceleration options).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    opts = accel.Options(**(group.accel or {}))
    loaded = load_model(group.checkpoint, device=device, dtype=accel.load_dtype("auto", opts))
    accel.apply(loaded.model, opts, loaded.device)
    accel.use_compiled_block(opts)  # as the worker does
    models = {"main": loaded.model}
    if group.verifier:
        models["verifier"] = load_model(str(GOLDEN / group.verifier), device=device).model
    timer = Timer(models, loaded.tokenizer.vocab_size)
    for res in served.values():
        body = res["request"]
        traces: dict[int, list[Pass]] = {}
        failed: dict[int, str] = {}
        for i, prompt in enumerate(pool):
            try:
                traces[i] = trace(loaded, models, body, prompt)
            except ParamError as err:  # the server refused the mode too
                failed[i] = str(err)
                break
            except Exception as err:  # noqa: BLE001 - a strategy/runner failure, reported
                failed[i] = f"{type(err).__name__}: {err}"
        if failed:
            res["trace_errors"] = {str(i): msg for i, msg in failed.items()}
        if not traces:
            continue
        shapes: Counter[Pass] = Counter()
        for t in traces.values():
            shapes.update(t)
        res["trace"] = {
            "prompts": len(traces),
            "passes_per_request": statistics.fmean(len(t) for t in traces.values()),
            # Tokens one pass runs over (rows x width), over all the replayed passes.
            "tokens_per_pass": statistics.fmean(w * r for t in traces.values() for _, w, r, _ in t),
            "shapes": [
                {"model": m, "width": w, "rows": r, "span": s, "per_request": k / len(traces)}
                for (m, w, r, s), k in sorted(shapes.items())
            ],
        }
        for lv in res["levels"]:
            c = lv["concurrency"]
            sent = sent_prompts(len(pool), c, per_client)
            if any(i not in traces for i in sent):
                continue  # no bound where a prompt could not be replayed
            lv["passes_per_request"] = statistics.fmean(len(traces[i]) for i in sent)
            seconds = statistics.fmean(sum(timer(p, c) for p in traces[i]) for i in sent)
            lv["bound_tokens_per_s"] = c * int(body["max_tokens"]) / seconds
            lv["of_bound"] = lv["tokens_per_s"] / lv["bound_tokens_per_s"]
    logger.enable("vdiff_worker")


# ---- report ----------------------------------------------------------------------------------
def finish(results: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Speedups against C=1, and the table's rows."""
    rows: list[dict[str, Any]] = []
    for model, modes in results.items():
        for label, res in modes.items():
            levels = res["levels"]
            one = next((lv for lv in levels if lv["concurrency"] == 1), None)
            for lv in levels:
                lv["speedup"] = lv["tokens_per_s"] / one["tokens_per_s"] if one else math.nan
                # What the bound itself gains from batching, against which to read speedup.
                lv["bound_speedup"] = (
                    lv["bound_tokens_per_s"] / one["bound_tokens_per_s"]
                    if one and "bound_tokens_per_s" in one and "bound_tokens_per_s" in lv
                    else math.nan
                )
                rows.append(
                    {
                        "model": model,
                        "mode": label,
                        "C": lv["concurrency"],
                        "req": lv["requests"],
                        "tok/s": lv["tokens_per_s"],
                        "compl tok/s": lv["completion_tokens_per_s"],
                        "lat s": lv["latency_mean_s"],
                        "rows/call": lv["rows_per_call"],
                        "calls/req": lv["calls_per_request"],
                        "pass/req": lv.get("passes_per_request", math.nan),
                        "tok/pass": res.get("trace", {}).get("tokens_per_pass", math.nan),
                        "speedup": lv["speedup"],
                        "bound tok/s": lv.get("bound_tokens_per_s", math.nan),
                        "of bound": lv.get("of_bound", math.nan),
                    }
                )
            if "error" in res and not levels:
                rows.append(
                    {
                        "model": model,
                        "mode": label,
                        "C": "-",
                        "req": 0,
                        **{
                            k: "-"
                            for k in (
                                "tok/s",
                                "compl tok/s",
                                "lat s",
                                "rows/call",
                                "calls/req",
                                "pass/req",
                                "tok/pass",
                                "speedup",
                                "bound tok/s",
                                "of bound",
                            )
                        },
                    }
                )
    return rows


def level(
    results: dict[str, dict[str, dict[str, Any]]], model: str, mode: str, c: int
) -> dict[str, Any] | None:
    res = results.get(model, {}).get(mode)
    return next((lv for lv in res["levels"] if lv["concurrency"] == c), None) if res else None


def targets(results: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The figures the engine is held to: (what, figure, target, met)."""
    out = []
    for model, mode, c, key, goal, what in (
        ("llada-tiny", "threshold+dual", 16, "speedup", 1.4, "speedup vs C=1"),
        ("llada-tiny", "threshold+dual", 16, "rows_per_call", 8.0, "rows per model call"),
        ("dream-tiny", "apd", 8, "rows_per_call", 4.0, "rows per model call"),
    ):
        lv = level(results, model, mode, c)
        value = lv[key] if lv else None
        out.append(
            {
                "figure": f"{model} {mode} C={c} {what}",
                "value": value,
                "target": goal,
                "met": value is not None and value >= goal,
                "bound": lv.get("bound_speedup") if lv and key == "speedup" else None,
            }
        )
    return out


def checks(results: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Where the server's model calls at C=1 are not the replayed passes of the same
    requests (they should be: one sequence, one row per call)."""
    out = []
    for model, modes in results.items():
        for label in modes:
            lv = level(results, model, label, 1)
            if (
                lv
                and "passes_per_request" in lv
                and abs(lv["calls_per_request"] - lv["passes_per_request"]) > 1e-9
            ):
                out.append(
                    f"{model} {label}: at C=1 the server made {lv['calls_per_request']:.2f}"
                    f" model calls per request, the replay {lv['passes_per_request']:.2f}"
                )
    return out


def measure(
    tmp: Path,
    group: Group,
    modes: list[Mode],
    max_tokens: int,
    per_client: int,
    levels: tuple[int, ...] | None,
) -> dict[str, dict[str, Any]]:
    """A group's modes through a real server, each level with its bound beside it."""
    pool = prompts(group.cases)
    print(f"{group.model}: serving {len(modes)} modes", flush=True)
    served = serve_group(tmp, group, modes, pool, max_tokens, per_client, levels)
    bound_group(group, served, pool, per_client)
    return served


def show(results: dict[str, dict[str, dict[str, Any]]]) -> None:
    """The table, then each error a mode met."""
    print()
    print(table(finish(results)))
    for model, modes in results.items():
        for label, res in modes.items():
            if "error" in res:
                print(f"{model} {label}: error: {res['error']}")
            for i, msg in res.get("trace_errors", {}).items():
                print(f"{model} {label}: replaying prompt {i} in-process failed: {msg}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--max-tokens", type=int, default=128, help="canvas length per request")
    ap.add_argument(
        "--requests",
        type=int,
        default=2,
        help="requests each client thread sends back to back, per level",
    )
    ap.add_argument("--quick", action="store_true", help="a tiny run: --max-tokens 32 --requests 1")
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated model/mode labels to run (default: all), "
        "e.g. llada-tiny/threshold+dual,dream-tiny/apd",
    )
    ap.add_argument(
        "--levels",
        default="",
        help="comma-separated concurrencies for every mode (default: 1,4,16; APD also 8)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.max_tokens, args.requests = 32, 1
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    levels = tuple(int(x) for x in args.levels.split(",")) if args.levels else None
    if levels and max(levels) > MAX_NUM_SEQS:
        ap.error(f"concurrency above --max-num-seqs {MAX_NUM_SEQS} would only queue")
    known = {f"{g.model}/{m.label}" for g in GROUPS for m in g.modes}
    if only - known:
        ap.error(f"unknown modes {sorted(only - known)}; known: {sorted(known)}")
    results: dict[str, dict[str, dict[str, Any]]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for group in GROUPS:
            chosen = [m for m in group.modes if not only or f"{group.model}/{m.label}" in only]
            if chosen:
                results[group.model] = measure(
                    Path(tmp), group, chosen, args.max_tokens, args.requests, levels
                )
    show(results)
    for note in checks(results):
        print(note)
    goals = targets(results)
    print()
    for g in goals:
        value = "not measured" if g["value"] is None else f"{g['value']:.2f}"
        bound = "" if g["bound"] is None else f"; the bound's own: {g['bound']:.2f}"
        print(
            f"{g['figure']}: {value} (target >= {g['target']}{bound}): "
            f"{'met' if g['met'] else 'NOT met'}"
        )
    report = {
        "max_tokens": args.max_tokens,
        "block_length": BLOCK,
        "requests_per_client": args.requests,
        "max_num_seqs": MAX_NUM_SEQS,
        "num_threads": 1,
        "seconds": time.perf_counter() - started,
        "results": results,
        "targets": goals,
        "checks": checks(results),
    }
    path = write_json("engine", report)
    common = sorted(
        set.intersection(
            *[
                {lv["concurrency"] for lv in res["levels"]}
                for modes in results.values()
                for res in modes.values()
                if res["levels"]
            ]
            or [set()]
        )
    )
    series: dict[str, Sequence[float]] = {
        f"{model} {label}": [
            lv["tokens_per_s"] for lv in res["levels"] if lv["concurrency"] in common
        ]
        for model, modes in results.items()
        for label, res in modes.items()
        if res["levels"]
    }
    png = (
        plot("engine", common, series, "concurrent clients", "canvas tokens / s")
        if common and series
        else None
    )
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))
    return report


if __name__ == "__main__":
    main()

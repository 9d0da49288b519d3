"""Step-level batching engine: every step, one batched forward over all active sequences."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jinja2
import torch
from loguru import logger

from vdiff_common.protocol import Error, Generate, Load, Message
from vdiff_worker.decoding import strategy_for
from vdiff_worker.decoding.base import Context, Forward, ParamError, Settings
from vdiff_worker.metrics import WorkerMetrics
from vdiff_worker.models.base import ModelOutput
from vdiff_worker.models.loader import LoadedModel
from vdiff_worker.sequence import Sequence
from vdiff_worker.stats import StepStats

Emit = Callable[[int, Message], None]
SHAPE_BUCKET = 32  # with shape_buckets, padded passes are a multiple of this many tokens long


@dataclass
class Defaults:
    """Server-wide defaults for fields a request leaves unset."""

    max_tokens: int = 128
    diffusion_steps: int | None = None  # None: one step per token
    block_length: int = 32
    decoding: str = "reference"
    remasking: str = "low_confidence"
    temperature: float = 0.0
    threshold: float = 0.9
    factor: float = 1.0  # Fast-dLLM's default
    cache: str = "none"
    alg: str = "entropy"
    max_parallel: int | None = None  # tokens committed per pass, for threshold/factor/apd


class Engine:
    def __init__(self, loaded: LoadedModel, defaults: Defaults, emit: Emit,
                 max_num_seqs: int = 16, request_timeout: float | None = None,
                 verifier: torch.nn.Module | None = None, max_queue_size: int = 256,
                 metrics: WorkerMetrics | None = None, shape_buckets: bool = False) -> None:
        self.loaded = loaded
        self.models = {"main": loaded.model}
        if verifier is not None:
            self.models["verifier"] = verifier
        self.defaults = defaults
        self.emit = emit
        self.max_num_seqs = max_num_seqs
        self.max_queue_size = max_queue_size
        self.request_timeout = request_timeout
        # Pad plain passes to bucketed shapes (rows to a power of two, length to a multiple of
        # SHAPE_BUCKET), so a CUDA-graph compiled model records few graphs.
        self.shape_buckets = shape_buckets
        self.stats = StepStats()
        self.metrics = metrics or WorkerMetrics(loaded.name, "local")
        # Fault-injection hook for tests of the memory guard: a model call over this many
        # tokens (rows x length) raises OutOfMemoryError as a real device would.
        self._oom_tokens = int(os.environ.get("VDIFF_FAULT_OOM_TOKENS", "0"))
        self.inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.steps = 0
        self.accepting = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    # ---- called from the network thread ----------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(("wake", None))
        self._thread.join(timeout=10)

    def submit(self, job: Generate, reply_to: int) -> None:
        self.inbox.put(("job", (job, reply_to, time.perf_counter())))

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id))

    def load(self) -> Load:
        running, waiting = len(self.running), len(self.waiting)
        st = self.stats
        return Load(running=running, waiting=waiting,
                    free_slots=max(0, self.max_num_seqs - running - waiting),
                    steps_per_s=round(st.steps_per_s(), 3),
                    tokens_per_forward=round(st.tokens_per_forward(), 3),
                    batch_mean=round(st.batch_mean(), 3), batch_max=st.batch_max())

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting and self.inbox.empty()

    # ---- engine thread -------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            self._drain_inbox(block=not (self.running or self.waiting))
            self._expire()
            while self.waiting and len(self.running) < self.max_num_seqs:
                self.running.append(self.waiting.popleft())
            if self.running:
                try:
                    self.step()
                except Exception as err:  # noqa: BLE001 - a bad batch must not kill the worker
                    self._isolate(err)

    def _drain_inbox(self, block: bool) -> None:
        try:
            kind, item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if kind == "job":
                assert isinstance(item, tuple)
                self._admit(*item)
            elif kind == "abort":
                self._drop(str(item))
            try:
                kind, item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _admit(self, job: Generate, reply_to: int, arrived: float) -> None:
        if not self.accepting:
            self.emit(reply_to, Error(job.request_id, 503, "worker is shutting down"))
            return
        if len(self.waiting) + job.n > self.max_queue_size:
            self.emit(reply_to, Error(job.request_id, 429, "worker queue is full; retry later"))
            return
        try:
            seqs = self._sequences(job, reply_to, arrived)
        except ParamError as err:
            self.emit(reply_to, Error(job.request_id, 400, str(err), err.param))
            return
        except (ValueError, jinja2.TemplateError) as err:  # the chat template refuses the input
            self.emit(reply_to, Error(job.request_id, 400, str(err),
                                      "messages" if job.messages is not None else "prompt"))
            return
        except Exception as err:  # noqa: BLE001 - one bad job must not stop the engine
            logger.exception("request {} could not start", job.request_id)
            self.emit(reply_to, Error(job.request_id, 500,
                                      f"request could not start: {type(err).__name__}"))
            return
        self.waiting.extend(seqs)

    def _settings(self, job: Generate) -> tuple[Settings, str]:
        p, d = job.params, self.defaults
        gen = p.max_tokens or d.max_tokens
        block = min(p.block_length or d.block_length, gen)
        s = Settings(
            gen_length=gen, steps=p.diffusion_steps or d.diffusion_steps or gen,
            block_length=block,
            temperature=d.temperature if p.temperature is None else p.temperature,
            top_p=p.top_p, top_k=p.top_k, remasking=p.remasking or d.remasking,
            threshold=d.threshold if p.threshold is None else p.threshold,
            factor=d.factor if p.factor is None else p.factor, cache=p.cache or d.cache,
            cfg_scale=p.cfg_scale, alg=p.alg or d.alg, alg_temp=p.alg_temp,
            apd_mixture_weight=(Settings.apd_mixture_weight if p.apd_mixture_weight is None
                                else p.apd_mixture_weight),
            apd_kv_window=p.apd_kv_window, apd_max_lookahead=p.apd_max_lookahead,
            max_parallel=d.max_parallel, models=frozenset(self.models))
        return s, p.decoding or d.decoding

    def _prompt_ids(self, job: Generate) -> list[int]:
        tok = self.loaded.tokenizer
        if job.messages is not None:
            return tok.apply_chat_template(job.messages)
        if job.prompt is not None:
            return tok.encode(job.prompt)
        ids = list(job.prompt_ids or [])
        bad = [t for t in ids if not 0 <= t < tok.vocab_size]
        if bad:
            raise ParamError("prompt", f"token id {bad[0]} is outside the vocabulary "
                                       f"(size {tok.vocab_size})")
        return ids

    def _sequences(self, job: Generate, reply_to: int, arrived: float) -> list[Sequence]:
        settings, decoding = self._settings(job)
        cls = strategy_for(self.loaded.kind, decoding)
        cls.refuse_unused(job.params, self.loaded.kind)
        if settings.steps > settings.gen_length:
            raise ParamError("diffusion_steps", f"diffusion_steps ({settings.steps}) must not "
                                                f"exceed max_tokens ({settings.gen_length}): a "
                                                "step commits at least one token")
        cls.check(settings)
        ids = self._prompt_ids(job)
        limit = self.loaded.max_model_len
        if len(ids) + settings.gen_length > limit:
            raise ParamError("max_tokens", f"prompt ({len(ids)} tokens) plus max_tokens "
                                           f"({settings.gen_length}) exceeds the model's "
                                           f"maximum context length of {limit} tokens")
        device = self.loaded.device
        prompt = torch.tensor(ids, dtype=torch.long, device=device)
        stop_ids = self.loaded.tokenizer.stop_token_ids | frozenset(job.params.stop_token_ids)
        deadline = time.monotonic() + self.request_timeout if self.request_timeout else None
        out = []
        for i in range(job.n):
            gen = torch.Generator(device=device)
            seed = job.params.seed
            gen.manual_seed(seed + i if seed is not None else int(torch.randint(2**62, ())))
            mask_id = self.loaded.mask_token_id if self.loaded.mask_token_id is not None else -1
            ctx = Context(prompt=prompt, settings=settings, mask_id=mask_id, generator=gen)
            out.append(Sequence(
                request_id=job.request_id, index=i, reply_to=reply_to, ctx=ctx,
                strategy=cls(ctx), tokenizer=self.loaded.tokenizer, stop_ids=stop_ids,
                stop_strings=list(job.params.stop), early_stop=job.params.eos_early_stop,
                stream=job.stream, deadline=deadline, arrived=arrived))
        return out

    def _drop(self, request_id: str) -> None:
        for pool in (self.running, self.waiting):
            for seq in [s for s in pool if s.request_id == request_id]:
                seq.close()
                pool.remove(seq)  # type: ignore[attr-defined]

    def _expire(self) -> None:
        now = time.monotonic()
        for seq in [s for s in (*self.running, *self.waiting)
                    if s.deadline is not None and now > s.deadline]:
            self._drop(seq.request_id)
            self.emit(seq.reply_to, Error(seq.request_id, 408, "request timed out"))

    # ---- one step ----------------------------------------------------------------------
    def step(self) -> None:
        active = [s for s in self.running if s.pending is not None]
        calls = [s.pending for s in active if s.pending is not None]
        before = [s.committed() for s in active]
        outputs = self._forward(calls)
        rows = sum(int(f.input_ids.shape[0]) for f in calls)
        for seq, out in zip(active, outputs):
            seq.advance(out)
        self.steps += 1
        committed = 0
        for seq, had, call in zip(active, before, calls):
            now = seq.committed() - had
            committed += now
            self.metrics.per_forward.observe(now / int(call.input_ids.shape[0]))
        self.stats.record(rows, committed)
        m = self.metrics
        m.forwards.inc(rows)
        m.parallel.inc(committed)
        m.batch.observe(rows)
        m.active.set(len(self.running))
        m.queue.set(len(self.waiting))
        if self.steps % 50 == 0:
            m.memory()
        for seq in list(self.running):
            seq.collect()
            if seq.done:
                seq.close()
                self.running.remove(seq)
                self.emit(seq.reply_to, seq.result())
            elif seq.stream and (chunk := seq.chunk()) is not None:
                self.emit(seq.reply_to, chunk)

    def _isolate(self, err: Exception) -> None:
        """A batched step failed: step each sequence alone; those that still fail end alone."""
        logger.warning("batched step failed ({}); retrying {} sequences one by one",
                       err, len(self.running))
        for seq in list(self.running):
            if seq.pending is None:
                continue
            try:
                seq.advance(self._forward([seq.pending])[0])
            except torch.OutOfMemoryError:
                logger.error("request {} does not fit in memory even alone", seq.request_id)
                self._drop(seq.request_id)
                self.emit(seq.reply_to, Error(
                    seq.request_id, 503, "out of memory: this request does not fit on the "
                    "worker even alone; use a shorter prompt or a smaller max_tokens"))
            except Exception as alone:  # noqa: BLE001
                logger.exception("request {} failed", seq.request_id)
                self._drop(seq.request_id)
                self.emit(seq.reply_to, Error(seq.request_id, 500,
                                              f"generation failed: {type(alone).__name__}"))

    def _forward(self, calls: list[Forward]) -> list[ModelOutput]:
        """Run the calls: plain passes as one padded batch, cached ones on their own."""
        results: list[ModelOutput | None] = [None] * len(calls)
        plain = [i for i, f in enumerate(calls) if f.batchable]
        for i, f in enumerate(calls):
            if not f.batchable:
                results[i] = self._call(f)
        if plain:
            for i, out in zip(plain, self._batched([calls[i] for i in plain])):
                results[i] = out
        return results  # type: ignore[return-value]

    def _guard(self, rows: int, length: int) -> None:
        if self._oom_tokens and rows * length > self._oom_tokens:
            raise torch.OutOfMemoryError(f"injected: {rows}x{length} tokens")

    def _call(self, f: Forward) -> ModelOutput:
        self._guard(*f.input_ids.shape)
        if f.new_tokens:
            model: Any = self.models[f.model]  # a transformers model: it has .generate
            out = model.generate(f.input_ids, max_new_tokens=f.new_tokens)
            tokens = out.sequences[:, f.input_ids.shape[1]:]
            return ModelOutput(logits=tokens.new_empty(0), kv=None, tokens=tokens)
        return self.models[f.model](f.input_ids, position_ids=f.position_ids, key_mask=f.key_mask,
                     kv_before=f.kv_before, kv_after=f.kv_after, return_kv=f.return_kv)

    def _batched(self, calls: list[Forward]) -> list[ModelOutput]:
        """One padded pass; on out-of-memory, split the batch in halves and retry each."""
        if len(calls) == 1 and not self.shape_buckets:
            return [self._call(calls[0])]
        try:
            return self._padded(calls)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            mid = len(calls) // 2
            logger.warning("out of memory on a batch of {}; splitting", len(calls))
            return self._batched(calls[:mid]) + self._batched(calls[mid:])

    def _padded(self, calls: list[Forward]) -> list[ModelOutput]:
        width = max(int(f.input_ids.shape[1]) for f in calls)
        rows_in = sum(int(f.input_ids.shape[0]) for f in calls)
        filler = 0
        if self.shape_buckets:
            width = -(-width // SHAPE_BUCKET) * SHAPE_BUCKET
            filler = (1 << (rows_in - 1).bit_length()) - rows_in
        ids, pos, keys = [], [], []
        for f in calls:
            rows, length = f.input_ids.shape
            pad = width - int(length)
            ids.append(torch.nn.functional.pad(f.input_ids, (0, pad)))
            pos.append(torch.nn.functional.pad(f.position_ids, (0, pad)))
            mask = f.key_mask if f.key_mask is not None else torch.ones(
                rows, length, dtype=torch.bool, device=f.input_ids.device)
            keys.append(torch.nn.functional.pad(mask, (0, pad), value=False))
        if filler:  # rows of padding only; their outputs are dropped
            like = calls[0].input_ids
            ids.append(like.new_zeros(filler, width))
            pos.append(like.new_zeros(filler, width))
            keys.append(torch.zeros(filler, width, dtype=torch.bool, device=like.device))
        self._guard(rows_in + filler, width)
        out = self.loaded.model(torch.cat(ids), position_ids=torch.cat(pos),
                                key_mask=torch.cat(keys))
        results, row = [], 0
        for f in calls:
            rows, length = f.input_ids.shape
            results.append(ModelOutput(logits=out.logits[row:row + rows, :length], kv=None))
            row += rows
        return results

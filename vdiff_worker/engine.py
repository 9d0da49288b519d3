"""The engine loop: every step, schedule, run the model calls batched, postprocess.

Jobs come in from the network thread (``submit``, ``abort``); admission turns each into its
sequences; the runner runs all pending model calls of the running sequences, batched; results
go out through ``emit``, addressed by request id.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

import jinja2
import torch
from loguru import logger

from vdiff_common.protocol import Error, Generate, Load, Message
from vdiff_worker.admission import Admission, Defaults
from vdiff_worker.decoding.base import Fetch, Forward, ParamError
from vdiff_worker.metrics import WorkerMetrics
from vdiff_worker.models.loader import LoadedModel
from vdiff_worker.runner import CacheMemoryError, Call, Runner
from vdiff_worker.sequence import Sequence
from vdiff_worker.stats import StepStats

Emit = Callable[[Message], None]


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        defaults: Defaults,
        emit: Emit,
        max_num_seqs: int = 16,
        request_timeout: float | None = None,
        verifier: torch.nn.Module | None = None,
        max_queue_size: int = 256,
        metrics: WorkerMetrics | None = None,
        shape_buckets: bool = False,
    ) -> None:
        self.loaded = loaded
        models = {"main": loaded.model}
        if verifier is not None:
            models["verifier"] = verifier
        self.emit = emit
        self.max_num_seqs = max_num_seqs
        self.max_queue_size = max_queue_size
        self.stats = StepStats()
        self.metrics = metrics or WorkerMetrics(loaded.name, "local")
        self.admission = Admission(loaded, defaults, frozenset(models), request_timeout)
        self.runner = Runner(
            models,
            slots=max_num_seqs,
            max_len=loaded.max_model_len,
            metrics=self.metrics,
            shape_buckets=shape_buckets,
        )
        self.inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.steps = 0
        self.aborted = 0  # requests dropped on their gateway's Abort
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

    def submit(self, job: Generate) -> None:
        self.inbox.put(("job", (job, time.perf_counter())))

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id))

    def load(self) -> Load:
        running, waiting = len(self.running), len(self.waiting)
        st = self.stats
        return Load(
            running=running,
            waiting=waiting,
            free_slots=max(0, self.max_num_seqs - running - waiting),
            steps_per_s=round(st.steps_per_s(), 3),
            tokens_per_forward=round(st.tokens_per_forward(), 3),
            batch_mean=round(st.batch_mean(), 3),
            batch_max=st.batch_max(),
            model_calls=self.runner.calls,
            model_rows=self.runner.rows,
            aborted=self.aborted,
        )

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting and self.inbox.empty()

    # ---- engine thread -------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            self._drain_inbox(block=not (self.running or self.waiting))
            self._expire()
            self._schedule()
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
            elif kind == "abort" and self._drop(str(item)):
                self.aborted += 1
                self.metrics.aborted.inc()
            try:
                kind, item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _admit(self, job: Generate, arrived: float) -> None:
        rid = job.request_id
        if not self.accepting:
            self.emit(Error(rid, 503, "worker is shutting down"))
            return
        if len(self.waiting) + job.n > self.max_queue_size:
            self.emit(Error(rid, 429, "worker queue is full; retry later"))
            return
        try:
            seqs = self.admission.sequences(job, arrived)
        except ParamError as err:
            self.emit(Error(rid, 400, str(err), err.param))
            return
        except (ValueError, jinja2.TemplateError) as err:  # the chat template refuses the input
            self.emit(
                Error(rid, 400, str(err), "messages" if job.messages is not None else "prompt")
            )
            return
        except Exception as err:  # noqa: BLE001 - one bad job must not stop the engine
            logger.exception("request {} could not start", rid)
            self.emit(Error(rid, 500, f"request could not start: {type(err).__name__}"))
            return
        self.waiting.extend(seqs)

    def _schedule(self) -> None:
        """Move waiting sequences to running while there is room and cache slots for them; a
        sequence that cannot get a slot waits for one to be freed."""
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            try:
                slots = self.runner.acquire(seq.strategy.cached_models())
            except CacheMemoryError as err:
                logger.error("{}", err)
                self._drop(seq.request_id)
                self.emit(Error(seq.request_id, 503, str(err)))
                continue
            if slots is None:
                return
            seq.slots = slots
            self.running.append(self.waiting.popleft())

    def _retire(self, seq: Sequence) -> None:
        seq.close()
        self.runner.release(seq.slots)
        seq.slots = {}

    def _drop(self, request_id: str) -> bool:
        """End the request's sequences; whether it had any."""
        dropped = False
        for pool in (self.running, self.waiting):
            for seq in [s for s in pool if s.request_id == request_id]:
                self._retire(seq)
                pool.remove(seq)  # type: ignore[attr-defined]
                dropped = True
        return dropped

    def _expire(self) -> None:
        now = time.monotonic()
        for seq in [
            s for s in (*self.running, *self.waiting) if s.deadline is not None and now > s.deadline
        ]:
            self._drop(seq.request_id)
            self.emit(Error(seq.request_id, 408, "request timed out"))

    # ---- one step ----------------------------------------------------------------------
    def step(self) -> None:
        active = self._due([s for s in self.running if isinstance(s.pending, Forward)])
        before = [s.committed() for s in active]
        calls = [
            Call(f, s.slots.get(f.model)) for s in active if isinstance(f := s.pending, Forward)
        ]
        for seq, out in zip(active, self.runner.run(calls)):
            seq.advance(out)
        self._fetch(active)
        self._postprocess(active, before, calls)

    def _fetch(self, seqs: list[Sequence]) -> None:
        """Copy to the host what the sequences' rules read, every sequence's in one transfer:
        one wait for the device per step (two for Dream's ``origin``, whose second fetch
        depends on the first)."""
        while waiting := [(s, f) for s in seqs if isinstance(f := s.pending, Fetch)]:
            hosts = self.runner.fetch([f for _, f in waiting])
            for (seq, _), host in zip(waiting, hosts):
                seq.advance(host)

    def _due(self, pending: list[Sequence]) -> list[Sequence]:
        """The sequences whose pass runs this step. Passes of different models cannot share
        a call: when several models have passes pending, those of the model with the most run
        and the others wait one step (no longer), so sequences that alternate between models
        (APD's draft and verifier) fall into step and share their calls."""
        rows = Counter(f.model for s in pending if isinstance(f := s.pending, Forward))
        if len(rows) < 2:
            return pending
        lead = max(rows, key=lambda m: rows[m])
        due = [
            s
            for s in pending
            if s.waited or (isinstance(s.pending, Forward) and s.pending.model == lead)
        ]
        for s in pending:
            s.waited = s not in due
        return due

    def _postprocess(self, active: list[Sequence], before: list[int], calls: list[Call]) -> None:
        self.steps += 1
        rows = sum(int(c.forward.input_ids.shape[0]) for c in calls)
        committed = 0
        for seq, had, call in zip(active, before, calls):
            now = seq.committed() - had
            committed += now
            self.metrics.per_forward.observe(now / int(call.forward.input_ids.shape[0]))
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
                self._retire(seq)
                self.running.remove(seq)
                self.emit(seq.result())
            elif seq.stream and (chunk := seq.chunk()) is not None:
                self.emit(chunk)

    def _isolate(self, err: Exception) -> None:
        """A batched step failed: step each sequence alone; those that still fail end alone."""
        logger.warning(
            "batched step failed ({}); retrying {} sequences one by one", err, len(self.running)
        )
        for seq in list(self.running):
            if seq.pending is None:
                continue
            try:
                if isinstance(f := seq.pending, Forward):
                    seq.advance(self.runner.run([Call(f, seq.slots.get(f.model))])[0])
                self._fetch([seq])  # also one whose fetch the failed step left pending
            except torch.OutOfMemoryError:
                logger.error("request {} does not fit in memory even alone", seq.request_id)
                self._drop(seq.request_id)
                self.emit(
                    Error(
                        seq.request_id,
                        503,
                        "out of memory: this request does not fit on the "
                        "worker even alone; use a shorter prompt or a smaller max_tokens",
                    )
                )
            except Exception as alone:  # noqa: BLE001
                logger.exception("request {} failed", seq.request_id)
                self._drop(seq.request_id)
                self.emit(Error(seq.request_id, 500, f"generation failed: {type(alone).__name__}"))

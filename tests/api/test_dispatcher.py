"""The dispatcher's face, without sockets: resolve's 400/404/503 rules (the only place they
live), the same refusals when a job is routed, the snapshot health and stats read, and
frames going the wrong way refused."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from vdiff_api.backend import NoWorker, WorkerState
from vdiff_api.dispatcher import Dispatcher, Worker
from vdiff_common import protocol
from vdiff_common.protocol import Abort, Generate, Load, ModelInfo, Welcome


@pytest.fixture()
def dispatcher() -> Iterator[Dispatcher]:
    d = Dispatcher("inproc://unused", heartbeat_s=1.0)
    yield d
    d._ctx.term()


def _add(
    d: Dispatcher,
    worker_id: str,
    *models: str,
    draining: bool = False,
    silent: bool = False,
    capacity: int = 2,
) -> Worker:
    """A registered worker, as _register would record it (no Welcome sent)."""
    w = Worker(
        identity=worker_id.encode(),
        worker_id=worker_id,
        models={m: ModelInfo(m, 64) for m in models},
        capacity=capacity,
        load=Load(running=1),
        last_seen=time.monotonic() - (10.0 if silent else 0.0),
        draining=draining,
    )
    d.workers[w.identity] = w
    d.seen_models.update(models)
    return w


def _refusal(d: Dispatcher, model: str | None) -> tuple[int, str]:
    with pytest.raises(NoWorker) as err:
        d.resolve(model)
    return err.value.status, err.value.message


def test_a_fresh_gateway_cannot_say_a_model_does_not_exist(dispatcher: Dispatcher) -> None:
    assert _refusal(dispatcher, "any") == (503, "no worker is registered yet; retry shortly")
    assert _refusal(dispatcher, None)[0] == 503


def test_served_unknown_and_unnamed(dispatcher: Dispatcher) -> None:
    _add(dispatcher, "w1", "a")
    assert dispatcher.resolve("a") == ModelInfo("a", 64)
    assert dispatcher.resolve(None) == ModelInfo("a", 64)  # the only one served
    assert _refusal(dispatcher, "b") == (404, "The model 'b' does not exist.")
    _add(dispatcher, "w2", "b")
    assert _refusal(dispatcher, None) == (400, "'model' is required")


def test_a_model_whose_workers_left_is_503_not_404(dispatcher: Dispatcher) -> None:
    _add(dispatcher, "w1", "a", draining=True)
    _add(dispatcher, "w2", "b", silent=True)
    _add(dispatcher, "w3", "c")
    for gone in ("a", "b"):
        assert _refusal(dispatcher, gone) == (503, f"no worker serving model '{gone}' is available")
    assert _refusal(dispatcher, "z")[0] == 404
    dispatcher.workers.pop(b"w3")
    assert _refusal(dispatcher, "z")[0] == 503  # no routable worker: it may be on its way


def test_routing_refuses_as_resolve_does_and_429_when_full(dispatcher: Dispatcher) -> None:
    worker = _add(dispatcher, "w1", "a", capacity=1)
    assert dispatcher._pick("a") is worker
    with pytest.raises(NoWorker) as unknown:
        dispatcher._pick("nope")
    assert (unknown.value.status, unknown.value.message) == _refusal(dispatcher, "nope")
    worker.inflight.add("busy")
    with pytest.raises(NoWorker) as full:
        dispatcher._pick("a")
    assert full.value.status == 429
    with pytest.raises(NoWorker) as only:
        dispatcher._pick("a", exclude=worker.identity)  # a retry has nowhere else to go
    assert only.value.status == 503


def test_snapshot_copies_what_health_and_stats_show(dispatcher: Dispatcher) -> None:
    busy = _add(dispatcher, "w1", "b", "a")
    busy.inflight.update({"r1", "r2"})
    _add(dispatcher, "w2", "c", draining=True)
    state = dispatcher.snapshot()
    assert state.models == {"a": ModelInfo("a", 64), "b": ModelInfo("b", 64)}  # routable
    assert state.workers == [
        WorkerState(
            id="w1", models=["a", "b"], draining=False, capacity=2, inflight=2, load=Load(running=1)
        ),
        WorkerState(
            id="w2", models=["c"], draining=True, capacity=2, inflight=0, load=Load(running=1)
        ),
    ]
    busy.inflight.clear()
    assert state.workers[0].inflight == 2  # a copy, not a view


def test_a_frame_meant_for_a_worker_is_counted_and_dropped(dispatcher: Dispatcher) -> None:
    _add(dispatcher, "w1", "a")
    for msg in (
        Generate(request_id="r", model="a", prompt="hi"),
        Abort(request_id="r"),
        Welcome(gateway_id="g", accepted=True),
    ):
        dispatcher._on_frames([b"w1", protocol.encode(msg)])
    assert dispatcher.frames.rejected == 3
    assert not dispatcher.jobs and list(dispatcher.workers) == [b"w1"]


def test_a_worker_silent_for_three_heartbeats_stops_routing_then_is_dropped(
    dispatcher: Dispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The gateway's own clock decides (heartbeat_s = 1): routable up to 3 s of silence, not
    # after; the next heartbeat tick then drops it and greets the others.
    now = [1000.0]
    monkeypatch.setattr("vdiff_api.dispatcher.time.monotonic", lambda: now[0])
    sent: list[bytes] = []
    monkeypatch.setattr(dispatcher, "_send", lambda identity, msg: sent.append(identity))
    quiet, chatty = _add(dispatcher, "w1", "a"), _add(dispatcher, "w2", "b")
    quiet.last_seen = chatty.last_seen = now[0]
    now[0] += 3.0
    assert dispatcher.routable(quiet)
    dispatcher._beat()
    assert sent == [b"w1", b"w2"] and len(dispatcher.workers) == 2
    now[0] += 0.01
    chatty.last_seen = now[0]
    assert not dispatcher.routable(quiet) and dispatcher.routable(chatty)
    assert _refusal(dispatcher, "a") == (503, "no worker serving model 'a' is available")
    sent.clear()
    dispatcher._beat()
    assert list(dispatcher.workers) == [b"w2"] and sent == [b"w2"]

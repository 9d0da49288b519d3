"""Gateway addresses: DNS names stand for every address they resolve to. Frames: only what a
gateway may send reaches the engine."""

from __future__ import annotations

from typing import cast

from vdiff_common import protocol, transport
from vdiff_common.protocol import Abort, Chunk, Generate, Goodbye, ModelInfo, Register, Tokens
from vdiff_worker.engine import Engine
from vdiff_worker.service import Link, WorkerService, resolve


def test_dns_name_resolves_to_every_address() -> None:
    assert "tcp://127.0.0.1:5557" in resolve("tcp://localhost:5557")


def test_literal_and_non_tcp_addresses_pass_through() -> None:
    assert resolve("tcp://127.0.0.1:9") == ["tcp://127.0.0.1:9"]
    assert resolve("ipc:///tmp/vdiff.sock") == ["ipc:///tmp/vdiff.sock"]


def test_unresolvable_name_gives_nothing_yet() -> None:
    assert resolve("tcp://no-such-host.invalid:5557") == []


class _Engine:
    """What the network side hands jobs to."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.aborted: list[str] = []

    def submit(self, job: Generate) -> None:
        self.submitted.append(job.request_id)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def test_a_frame_meant_for_a_gateway_is_counted_and_dropped() -> None:
    engine = _Engine()
    service = WorkerService(cast(Engine, engine), [], "w", ModelInfo("m", 64))
    link = Link(address="tcp://gateway:1", chan=cast(transport.Channel, None))
    try:
        for msg in (
            Chunk("r", 0, "hi", [1]),
            Register(version=protocol.PROTOCOL_VERSION, worker_id="x", models=[], capacity=1),
            Tokens("r"),
            Goodbye("g"),
        ):
            service._on_message(0, link, protocol.encode(msg))
        assert service.frames.rejected == 4 and not engine.submitted
        service._on_message(0, link, protocol.encode(Generate("r", "m", prompt="hi")))
        service._on_message(0, link, protocol.encode(Abort("r")))
        assert engine.submitted == engine.aborted == ["r"]
        assert service.frames.rejected == 4
    finally:
        service.ctx.term()

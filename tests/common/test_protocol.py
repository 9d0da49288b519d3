"""The wire protocol: typed round trips; bad frames are refused, never crash a loop."""

from __future__ import annotations

import msgspec
import pytest

from vdiff_common import protocol, transport
from vdiff_common.protocol import (
    Chunk,
    Generate,
    ModelInfo,
    Register,
    SamplingParams,
    Tokenize,
    Tokens,
)


def test_round_trip_keeps_types() -> None:
    msgs: list[protocol.Message] = [
        Register(version=protocol.PROTOCOL_VERSION, worker_id="w",
                 models=[ModelInfo("m", 512)], capacity=4),
        Generate(request_id="r", model="m", prompt_ids=[1, 2],
                 params=SamplingParams(max_tokens=8, stop=["x"])),
        Chunk(request_id="r", index=0, text="hi", token_ids=[5]),
        Tokenize(request_id="r", model="m", messages=[{"role": "user", "content": "hi"}]),
        Tokens(request_id="r", tokens=[1, 2]),
    ]
    for msg in msgs:
        assert protocol.decode(protocol.encode(msg)) == msg


@pytest.mark.parametrize("frame", [b"", b"\x00garbage", msgspec.msgpack.encode({"type": "Nope"}),
                                   msgspec.msgpack.encode({"type": "Chunk", "request_id": 3}),
                                   protocol.encode(Chunk("r", 0, "t", [1]))[:-3]])
def test_bad_frames_are_counted_and_dropped(frame: bytes) -> None:
    counter = transport.FrameCounter()
    assert transport.try_decode(frame, b"peer", counter) is None
    assert counter.rejected == 1

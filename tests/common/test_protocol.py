"""The wire protocol: typed round trips, one union per direction; bad frames and frames going
the other way are refused, never crash a loop."""

from __future__ import annotations

import typing

import msgspec
import pytest

from vdiff_common import protocol, transport
from vdiff_common.protocol import (
    Abort,
    Chunk,
    Done,
    Error,
    Generate,
    Goodbye,
    Heartbeat,
    ModelInfo,
    Register,
    SamplingParams,
    Tokenize,
    Tokens,
    Welcome,
)

TO_WORKER: list[protocol.ToWorker] = [
    Welcome(gateway_id="g", accepted=True),
    Heartbeat(sender_id="g"),
    Generate(
        request_id="r",
        model="m",
        prompt_ids=[1, 2],
        params=SamplingParams(max_tokens=8, stop=["x"]),
    ),
    Generate(request_id="r", model="m", messages=[{"role": "user", "content": "hi"}]),
    Abort(request_id="r"),
    Tokenize(request_id="r", model="m", messages=[{"role": "user", "content": "hi"}]),
]
TO_GATEWAY: list[protocol.ToGateway] = [
    Register(
        version=protocol.PROTOCOL_VERSION, worker_id="w", models=[ModelInfo("m", 512)], capacity=4
    ),
    Heartbeat(sender_id="w"),
    Chunk(request_id="r", index=0, text="hi", token_ids=[5]),
    Done(
        request_id="r",
        index=0,
        finish_reason="stop",
        prompt_tokens=1,
        completion_tokens=1,
        forward_passes=1,
    ),
    Error(request_id="r", status=400, message="no", param="prompt"),
    Goodbye(sender_id="w"),
    Tokens(request_id="r", tokens=[1, 2]),
]


def test_round_trip_keeps_types() -> None:
    for msg in TO_WORKER:
        assert protocol.decode_for_worker(protocol.encode(msg)) == msg
    for reply in TO_GATEWAY:
        assert protocol.decode_for_gateway(protocol.encode(reply)) == reply
    for any_msg in [*TO_WORKER, *TO_GATEWAY]:
        assert protocol.decode(protocol.encode(any_msg)) == any_msg


def test_every_message_has_a_direction_and_only_heartbeat_has_both() -> None:
    to_worker = set(typing.get_args(protocol.ToWorker))
    to_gateway = set(typing.get_args(protocol.ToGateway))
    tagged = {
        v
        for v in vars(protocol).values()
        if isinstance(v, type)
        and issubclass(v, msgspec.Struct)
        and v.__struct_config__.tag is not None
    }
    assert to_worker | to_gateway == tagged == set(typing.get_args(protocol.Message))
    assert to_worker & to_gateway == {Heartbeat}
    assert {type(m) for m in TO_WORKER} == to_worker
    assert {type(m) for m in TO_GATEWAY} == to_gateway


@pytest.mark.parametrize(
    "msg", [m for m in TO_WORKER if not isinstance(m, Heartbeat)], ids=lambda m: type(m).__name__
)
def test_a_worker_bound_message_is_refused_by_a_gateway(msg: protocol.Message) -> None:
    counter = transport.FrameCounter()
    frame = protocol.encode(msg)
    assert transport.try_decode(frame, b"peer", counter, protocol.decode_for_gateway) is None
    assert counter.rejected == 1
    assert transport.try_decode(frame, b"peer", counter, protocol.decode_for_worker) == msg


@pytest.mark.parametrize(
    "msg", [m for m in TO_GATEWAY if not isinstance(m, Heartbeat)], ids=lambda m: type(m).__name__
)
def test_a_gateway_bound_message_is_refused_by_a_worker(msg: protocol.Message) -> None:
    counter = transport.FrameCounter()
    frame = protocol.encode(msg)
    assert transport.try_decode(frame, b"peer", counter, protocol.decode_for_worker) is None
    assert counter.rejected == 1
    assert transport.try_decode(frame, b"peer", counter, protocol.decode_for_gateway) == msg


@pytest.mark.parametrize("decode", [protocol.decode_for_gateway, protocol.decode_for_worker])
@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x00garbage",
        msgspec.msgpack.encode({"type": "Nope"}),
        msgspec.msgpack.encode({"type": "Chunk", "request_id": 3}),
        protocol.encode(Chunk("r", 0, "t", [1]))[:-3],
        protocol.encode(Heartbeat("x"))[:-2],
    ],
)
def test_bad_frames_are_counted_and_dropped(
    frame: bytes, decode: typing.Callable[[bytes], object]
) -> None:
    counter = transport.FrameCounter()
    assert transport.try_decode(frame, b"peer", counter, decode) is None
    assert counter.rejected == 1


def test_chat_turns_carry_text_only() -> None:
    frame = msgspec.msgpack.encode(
        {
            "type": "Generate",
            "request_id": "r",
            "model": "m",
            "messages": [{"role": "user", "content": [1, 2]}],
        }
    )
    with pytest.raises(msgspec.ValidationError, match="messages"):
        protocol.decode_for_worker(frame)

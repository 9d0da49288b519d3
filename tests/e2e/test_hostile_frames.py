"""Garbage on the ZeroMQ port is refused and counted; the gateway and its worker keep serving."""

from __future__ import annotations

import re
import time

import httpx
import msgspec
import zmq

from tests.conftest import Server
from vdiff_common import protocol


def _rejected(s: Server) -> float:
    text = httpx.get(s.base + "/metrics").text
    found = re.search(r"^vdiff_rejected_frames_total (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def _workers(s: Server) -> list[str]:
    return [w["id"] for w in httpx.get(s.base + "/health").json()["workers"]]


def test_bad_frames_are_refused_and_counted(llada_server: Server) -> None:
    before = _rejected(llada_server)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"intruder")
    sock.connect(llada_server.zmq)
    frames = [b"", b"\xff\x00garbage", msgspec.msgpack.encode({"type": "Nope"}),
              protocol.encode(protocol.Heartbeat("x"))[:-2],  # truncated
              msgspec.msgpack.encode({"type": "Chunk", "request_id": 1}),  # wrong types
              b"x" * 2_000_000]
    for f in frames:
        sock.send(f)
    sock.send_multipart([b"two", b"parts"])
    # A worker speaking another protocol version is answered, not registered.
    sock.send(protocol.encode(protocol.Register(
        version=protocol.PROTOCOL_VERSION + 1, worker_id="future", capacity=1,
        models=[protocol.ModelInfo("evil", 10)])))
    assert sock.poll(5000)
    welcome = protocol.decode(sock.recv())
    assert isinstance(welcome, protocol.Welcome) and not welcome.accepted
    assert "protocol version" in welcome.reason
    deadline = time.monotonic() + 5
    while _rejected(llada_server) - before < len(frames) + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _rejected(llada_server) - before == len(frames) + 1
    assert "future" not in _workers(llada_server)
    # A frame over the size limit makes ZeroMQ drop the sender; nothing reaches the gateway.
    sock.send(b"y" * (65 * 1024 * 1024))
    sock.close()
    ctx.term()
    r = httpx.post(llada_server.url + "/completions", timeout=60,
                   json={"model": "llada-tiny", "prompt": "hi", "max_tokens": 8})
    assert r.status_code == 200
    assert [m["id"] for m in httpx.get(llada_server.url + "/models").json()["data"]] == \
        ["llada-tiny"]

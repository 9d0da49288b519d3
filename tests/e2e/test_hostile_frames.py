"""Garbage on the ZeroMQ port is refused and counted; the gateway and its worker keep serving."""

from __future__ import annotations

import time

import httpx

from bench.reliability import rejected_frames, send_hostile_frames
from tests.conftest import Server
from vdiff_common import protocol


def _workers(s: Server) -> list[str]:
    return [w["id"] for w in httpx.get(s.base + "/health").json()["workers"]]


def test_bad_frames_are_refused_and_counted(llada_server: Server) -> None:
    before = rejected_frames(llada_server.base)
    expected, welcome = send_hostile_frames(llada_server.zmq)
    # A worker speaking another protocol version is answered, not registered.
    assert isinstance(welcome, protocol.Welcome) and not welcome.accepted
    assert "protocol version" in welcome.reason
    deadline = time.monotonic() + 5
    while rejected_frames(llada_server.base) - before < expected and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert rejected_frames(llada_server.base) - before == expected == 7
    assert "future" not in _workers(llada_server)
    r = httpx.post(llada_server.url + "/completions", timeout=60,
                   json={"model": "llada-tiny", "prompt": "hi", "max_tokens": 8})
    assert r.status_code == 200
    assert [m["id"] for m in httpx.get(llada_server.url + "/models").json()["data"]] == \
        ["llada-tiny"]

"""Garbage on the ZeroMQ port is refused and counted; the gateway and its worker keep serving."""

from __future__ import annotations

import httpx

from bench.reliability import refused_frames
from tests.conftest import Server
from vdiff_common import protocol


def test_bad_frames_are_refused_and_counted(llada_server: Server) -> None:
    expected, counted, welcome = refused_frames(llada_server.base, llada_server.zmq)
    # A worker speaking another protocol version is answered, not registered.
    assert isinstance(welcome, protocol.Welcome) and not welcome.accepted
    assert "protocol version" in welcome.reason
    assert counted == expected == 7
    workers = [w["id"] for w in httpx.get(llada_server.base + "/health").json()["workers"]]
    assert "future" not in workers
    r = httpx.post(
        llada_server.url + "/completions",
        timeout=60,
        json={"model": "llada-tiny", "prompt": "hi", "max_tokens": 8},
    )
    assert r.status_code == 200
    assert [m["id"] for m in httpx.get(llada_server.url + "/models").json()["data"]] == [
        "llada-tiny"
    ]

"""Gateway addresses: DNS names stand for every address they resolve to."""

from __future__ import annotations

from vdiff_worker.service import resolve


def test_dns_name_resolves_to_every_address() -> None:
    assert "tcp://127.0.0.1:5557" in resolve("tcp://localhost:5557")


def test_literal_and_non_tcp_addresses_pass_through() -> None:
    assert resolve("tcp://127.0.0.1:9") == ["tcp://127.0.0.1:9"]
    assert resolve("ipc:///tmp/vdiff.sock") == ["ipc:///tmp/vdiff.sock"]


def test_unresolvable_name_gives_nothing_yet() -> None:
    assert resolve("tcp://no-such-host.invalid:5557") == []

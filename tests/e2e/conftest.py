"""Servers shared by the gateway tests: one all-in-one with API keys, limits and JSON logs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import GOLDEN, Server, start_allinone

ENV_KEYS = ["env-key-0", "env-key-1"]  # via VDIFF_API_KEY
FILE_KEYS = [f"file-key-{i}" for i in range(8)]  # via --api-key-file; one per test that spends
TOKENS_PER_MINUTE = 64


@pytest.fixture(scope="session")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("secured")
    keyfile = tmp / "keys"
    keyfile.write_text("# one key per line\n\n" + "\n".join(FILE_KEYS) + "\n")
    server = start_allinone(
        tmp,
        "--model",
        str(GOLDEN / "llada-tiny"),
        "--api-key-file",
        str(keyfile),
        "--rate-limit-tokens",
        str(TOKENS_PER_MINUTE),
        "--log-format",
        "json",
        "--heartbeat-interval",
        "0.5",
        env={"VDIFF_API_KEY": ",".join(ENV_KEYS)},
    )
    yield server
    for p in server.procs:
        assert p.stop() == 0

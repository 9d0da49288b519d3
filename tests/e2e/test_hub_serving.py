"""`vdiff --model ORG/NAME`: Hugging Face ids through the real all-in-one server, offline.

The servers get HF_HUB_CACHE pointing at a cache built by hand from the golden checkpoints
and HF_HUB_OFFLINE=1, so huggingface_hub resolves every id there and nothing reaches the
network. The answers are the golden models' own: the snapshot served is the one asked for.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tests.conftest import GOLDEN, Server, free_port, spawn, start_allinone
from tests.hf_cache import SHARDS, add_snapshot, checkpoint_files, sharded_files

LLADA_ID = "vdiff-test/llada-tiny"
AR_ID = "vdiff-test/ar-tiny"
BROKEN_ID = "vdiff-test/llada-interrupted"
LLADA2_ID = "vdiff-test/llada2-tiny-bf16"


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """HF_HUB_CACHE with llada-tiny (main, and branch v2 with a 300-token context), ar-tiny,
    a sharded llada-tiny whose second shard never finished downloading, and llada2-tiny in
    bfloat16 shards, as LLaDA2.x ships."""
    tmp = tmp_path_factory.mktemp("hf")
    cache = tmp / "hub"
    add_snapshot(cache, LLADA_ID, checkpoint_files(GOLDEN / "llada-tiny"))
    add_snapshot(
        cache,
        LLADA_ID,
        checkpoint_files(GOLDEN / "llada-tiny", max_sequence_length=300),
        refs=("v2",),
    )
    add_snapshot(cache, AR_ID, checkpoint_files(GOLDEN / "ar-tiny"))
    broken = sharded_files(GOLDEN / "llada-tiny", tmp / "shards")
    del broken[SHARDS[1]]
    add_snapshot(cache, BROKEN_ID, broken)
    bf16 = sharded_files(GOLDEN / "llada2-tiny", tmp / "llada2-shards", torch.bfloat16)
    add_snapshot(cache, LLADA2_ID, bf16)
    # HF_HOME elsewhere too: the library must not find (or write) anything in the real one.
    return {"HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp / "home"), "HF_HUB_OFFLINE": "1"}


@contextmanager
def _serving(tmp: Path, env: dict[str, str], *flags: str) -> Iterator[Server]:
    server = start_allinone(tmp, *flags, env=env)
    try:
        yield server
    finally:
        for p in server.procs:
            p.stop()


@pytest.fixture(scope="module")
def by_id(tmp_path_factory: pytest.TempPathFactory, hub_env: dict[str, str]) -> Iterator[Server]:
    with _serving(
        tmp_path_factory.mktemp("by-id"), hub_env, "--model", LLADA_ID, "--trust-remote-code"
    ) as server:
        yield server


def test_id_is_served_under_the_name_typed(by_id: Server) -> None:
    client = openai.OpenAI(base_url=by_id.url, api_key="unused", max_retries=0)
    models = client.models.list().data
    assert [m.id for m in models] == [LLADA_ID]
    assert models[0].model_extra["max_model_len"] == 512  # main's config
    out = client.chat.completions.create(
        model=LLADA_ID, messages=[{"role": "user", "content": "What is 24 + 1?"}], max_tokens=32
    )
    assert out.choices[0].message.content == "11"  # golden: llada-tiny's answer
    assert out.choices[0].finish_reason == "stop"
    log = by_id.procs[0].output()
    assert "--trust-remote-code: llada is built in" in log
    assert f"{LLADA_ID} (revision main, commit" in log


def test_revision_picks_the_snapshot(tmp_path: Path, hub_env: dict[str, str]) -> None:
    with _serving(
        tmp_path,
        hub_env,
        "--model",
        LLADA_ID,
        "--revision",
        "v2",
        "--served-model-name",
        "llada-v2",
    ) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        models = client.models.list().data
        assert [m.id for m in models] == ["llada-v2"]  # --served-model-name still wins
        assert models[0].model_extra["max_model_len"] == 300  # branch v2's config
        out = client.chat.completions.create(
            model="llada-v2",
            messages=[{"role": "user", "content": "What is 24 + 1?"}],
            max_tokens=32,
        )
        assert out.choices[0].message.content == "11"  # same weights, other config
        assert f"{LLADA_ID} (revision v2, commit" in server.procs[0].output()


def test_autoregressive_fallback_by_id(tmp_path: Path, hub_env: dict[str, str]) -> None:
    case = json.loads((GOLDEN / "cases" / "shared_apd.json").read_text())["ar_greedy"][0]
    stop = {480, 482}  # <|endoftext|>, <|im_end|>
    want = case["output_ids"]
    want = want[: next((i for i, t in enumerate(want) if t in stop), len(want))]
    with _serving(tmp_path, hub_env, "--model", AR_ID) as server:
        r = httpx.post(
            server.url + "/completions",
            timeout=60,
            json={
                "model": AR_ID,
                "prompt": case["prompt_ids"],
                "max_tokens": case["max_new_tokens"],
                "temperature": 0,
                "return_token_ids": True,
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == want  # golden: transformers' greedy


def _refused(tmp: Path, env: dict[str, str], *flags: str) -> str:
    """Start `vdiff` and expect it to exit non-zero before serving; its log."""
    proc = spawn(
        "vdiff_api",
        [
            "--port",
            str(free_port()),
            "--zmq-bind",
            f"tcp://127.0.0.1:{free_port()}",
            "--num-threads",
            "1",
            *flags,
        ],
        tmp / "vdiff.log",
        env,
    )
    try:
        code = proc.popen.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.stop()
        pytest.fail(f"vdiff kept running:\n{proc.output()[-3000:]}")
    log = proc.output()
    assert code != 0, log
    return log


def test_offline_and_absent_is_refused_at_start(tmp_path: Path, hub_env: dict[str, str]) -> None:
    log = _refused(tmp_path, hub_env, "--model", "vdiff-test/absent")
    line = next(ln for ln in log.splitlines() if "cannot load model:" in ln)
    assert (
        "vdiff-test/absent (revision main) is not a local directory and not in the "
        f"Hugging Face cache {hub_env['HF_HUB_CACHE']}" in line
    )
    assert "HF_HUB_OFFLINE" in line and "`hf download vdiff-test/absent`" in line


def test_missing_shard_is_refused_at_start(tmp_path: Path, hub_env: dict[str, str]) -> None:
    log = _refused(tmp_path, hub_env, "--model", BROKEN_ID)
    line = next(ln for ln in log.splitlines() if "cannot load model:" in ln)
    assert f"{BROKEN_ID} (revision main): the cached snapshot" in line
    assert f"Missing: {SHARDS[1]} (named in model.safetensors.index.json)" in line
    assert "loading shard" not in log  # refused before any weight is read


def test_llada2_in_bfloat16_shards_by_id(tmp_path: Path, hub_env: dict[str, str]) -> None:
    with _serving(tmp_path, hub_env, "--model", LLADA2_ID, "--dtype", "bfloat16") as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [LLADA2_ID]
        out = client.chat.completions.create(
            model=LLADA2_ID,
            messages=[{"role": "user", "content": "What is 2 + 3?"}],
            max_tokens=16,
            extra_body={"return_token_ids": True},
        )
        assert out.choices[0].model_extra["token_ids"]  # the block loop ran in bfloat16
        log = server.procs[0].output()
        assert "loading llada2 checkpoint" in log and "torch.bfloat16" in log

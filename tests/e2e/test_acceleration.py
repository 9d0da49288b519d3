"""Acceleration flags through real servers: compiled, eager-attention and int8 workers against
the golden LLaDA outputs, and the combinations a worker refuses at start."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import GOLDEN, ROOT, Server, free_port, start_allinone

CASES = json.loads((GOLDEN / "cases" / "shared_llada.json").read_text())
STOP = {CASES["eos_token_id"], 485}  # <|endoftext|>, <|eot_id|>
SINGLE = [c for c in CASES["generate"] if "prompt_ids" in c]
# One case of each parameter set (steps, blocks, CFG): a handful, compiled workers are slow
# to start.
HANDFUL = list({json.dumps(c["params"], sort_keys=True): c for c in SINGLE}.values())
# Weight-only quantization moves the tiny model's logits (int8 by about 0.1). Measured on the 48
# single golden cases through a server: int8 keeps 47 answers exact and 99.1% of tokens; int4
# (bfloat16 activations, the vocabulary head unquantized) 28 and 79.4%. The bounds allow one
# or two answers flipped by another CPU's rounding, no more.
INT8_MIN_AGREEMENT = 0.98
INT8_MIN_EXACT = 46
INT4_MIN_AGREEMENT = 0.76
INT4_MIN_EXACT = 26


def answer(ids: list[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in STOP:
            return ids[:i]
    return ids


def generate(server: Server, case: dict) -> list[int]:
    p = case["params"]
    body = {
        "model": "llada-tiny",
        "prompt": case["prompt_ids"],
        "max_tokens": p["gen_length"],
        "diffusion_steps": p["steps"],
        "block_length": p["block_length"],
        "remasking": p["remasking"],
        "temperature": p["temperature"],
        "return_token_ids": True,
        **({"cfg_scale": p["cfg_scale"]} if "cfg_scale" in p else {}),
    }
    r = httpx.post(server.url + "/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return list(r.json()["choices"][0]["token_ids"])


def _server(tmp: pytest.TempPathFactory, name: str, *flags: str) -> Iterator[Server]:
    # A compiled worker compiles before it is ready: slow on a busy 2-core machine.
    server = start_allinone(
        tmp.mktemp(name), "--model", str(GOLDEN / "llada-tiny"), *flags, ready_timeout=600
    )
    yield server
    for p in server.procs:
        assert p.stop() == 0


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _server(tmp_path_factory, "compiled", "--compile")


@pytest.fixture(scope="module")
def eager_attention(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _server(tmp_path_factory, "eager", "--attention", "eager")


@pytest.fixture(scope="module")
def int8(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _server(tmp_path_factory, "int8", "--quantization", "8bit")  # the seed's name


def test_compiled_worker_gives_the_golden_tokens(compiled: Server) -> None:
    for case in HANDFUL:
        assert generate(compiled, case) == answer(case["output_ids"]), case["params"]
    log = compiled.procs[0].output()
    assert "torch.compile (mode default): warm-up compiled in" in log
    assert "running eager from now on" not in log


def test_eager_attention_worker_gives_the_golden_tokens(eager_attention: Server) -> None:
    for case in HANDFUL:
        assert generate(eager_attention, case) == answer(case["output_ids"]), case["params"]


@pytest.fixture(scope="module")
def int4(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _server(tmp_path_factory, "int4", "--quantization", "int4")


def _agreement(server: Server) -> tuple[int, float]:
    """Golden answers matched exactly, and the share of their tokens that agree."""
    exact, same, total = 0, 0, 0
    for case in SINGLE:
        got, want = generate(server, case), answer(case["output_ids"])
        exact += got == want
        same += sum(a == b for a, b in zip(got, want))
        total += max(len(got), len(want), 1)
    return exact, same / total


def test_int8_worker_agrees_with_the_golden_tokens(int8: Server) -> None:
    exact, agreement = _agreement(int8)
    assert agreement >= INT8_MIN_AGREEMENT
    assert exact >= INT8_MIN_EXACT
    assert "int8 weight-only quantization: 17 of 17 linear layers" in int8.procs[0].output()


def test_int4_worker_serves_in_bfloat16_and_agrees_with_the_golden_tokens(int4: Server) -> None:
    exact, agreement = _agreement(int4)
    assert agreement >= INT4_MIN_AGREEMENT
    assert exact >= INT4_MIN_EXACT
    log = int4.procs[0].output()
    assert "as torch.bfloat16 on cpu" in log
    assert "int4 weight-only quantization: 16 of 17 linear layers" in log


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--attention", "flash"], "--attention flash needs a CUDA GPU; this worker runs on cpu"),
        (["--flash-attention"], "--attention flash needs a CUDA GPU"),
        (
            ["--attention", "eager", "--flash-attention"],
            "--flash-attention contradicts --attention eager",
        ),
        (
            ["--quantization", "int4", "--dtype", "float32"],
            "--quantization int4 needs bfloat16 activations",
        ),
        (
            ["--quantization", "4bit", "--dtype", "float16"],
            "--quantization int4 needs bfloat16 activations",
        ),
    ],
)
def test_worker_refuses_at_start(flags: list[str], message: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vdiff_worker",
            "--model",
            str(GOLDEN / "llada-tiny"),
            "--gateway",
            "tcp://127.0.0.1:9",
            *flags,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr


def test_allinone_exits_when_its_worker_refuses() -> None:
    # The seed's alias travels from `vdiff` to its worker process.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vdiff_api",
            "--port",
            str(free_port()),
            "--zmq-bind",
            f"tcp://127.0.0.1:{free_port()}",
            "--flash-attention",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "--attention flash needs a CUDA GPU" in proc.stderr

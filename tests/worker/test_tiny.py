"""The built-in models: layout, size, tokenizer, data hygiene, and answers through the server."""

from __future__ import annotations

import json
import queue
import re
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import openai
import pytest
import torch
from safetensors import safe_open

from tests.conftest import GOLDEN, ROOT, Server, start_allinone
from vdiff_common.protocol import Done, Generate, Message, SamplingParams
from vdiff_worker.admission import Defaults
from vdiff_worker.cli import DEFAULT_MODEL
from vdiff_worker.engine import Engine
from vdiff_worker.models import LoadedModel, load_model
from vdiff_worker.tiny import MODEL_DIR, VERIFIER_DIR
from vdiff_worker.tiny.tasks import HELD_OUT_SEED, suite
from vdiff_worker.tiny.train import (
    DIGITS_WEIGHTS,
    SPECIALS,
    UNFILTERED_KINDS,
    build_tokenizer,
    excluded_prompts,
    forward_with_mask,
    render_chat,
    task_stream,
)

LLADA_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}
# The shipped weights answer 70 of these 80 held-out prompts through the engine
# (bench/accuracy.py's settings: canvas 32, one block); the floor leaves room for two answers
# flipped by the float noise of other CPUs, not for a worse model.
HELD_OUT_FLOOR = 68 / 80


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_model(str(MODEL_DIR))


@pytest.fixture(scope="module")
def verifier() -> LoadedModel:
    return load_model(str(VERIFIER_DIR))


def test_default_model_is_vdiff_tiny() -> None:
    assert Path(DEFAULT_MODEL).resolve() == MODEL_DIR


def test_llada_layout(tiny: LoadedModel) -> None:
    assert LLADA_FILES <= {p.name for p in MODEL_DIR.iterdir()}
    config = json.loads((MODEL_DIR / "config.json").read_text())
    golden = json.loads((GOLDEN / "llada-tiny" / "config.json").read_text())
    assert set(config) == set(golden)
    assert config["architectures"] == ["LLaDAModelLM"] and config["model_type"] == "llada"
    with safe_open(str(MODEL_DIR / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    assert names and all(n.startswith("model.transformer.") for n in names)
    assert tiny.kind == "llada" and tiny.name == "vdiff-tiny"
    assert (
        tiny.mask_token_id == tiny.tokenizer.token_to_id("<|mdm_mask|>") == config["mask_token_id"]
    )
    assert tiny.tokenizer.token_to_id("<|endoftext|>") == config["eos_token_id"]
    assert tiny.tokenizer.token_to_id("<|eot_id|>") in tiny.tokenizer.stop_token_ids


def test_verifier_is_a_qwen2_causal_lm_on_the_same_tokenizer(
    tiny: LoadedModel, verifier: LoadedModel
) -> None:
    config = json.loads((VERIFIER_DIR / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert verifier.kind == "ar"
    assert (VERIFIER_DIR / "tokenizer.json").read_text() == (
        MODEL_DIR / "tokenizer.json"
    ).read_text()
    text = "What is 12 + 30? Sort the numbers: 5 17 3. Zebra!\n"
    assert verifier.tokenizer.encode(text) == tiny.tokenizer.encode(text)


def test_shipped_size_fits_the_budget() -> None:
    total = sum(p.stat().st_size for d in (MODEL_DIR, VERIFIER_DIR) for p in d.iterdir())
    assert total <= 25 * 2**20


def test_package_data_ships_every_model_file() -> None:
    # tomllib is Python 3.11+; the line is simple enough to read directly.
    line = re.search(
        r'^"vdiff_worker\.tiny" = \[(.*)\]$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE
    )
    assert line is not None
    patterns = re.findall(r'"([^"]+)"', line.group(1))
    tiny_root = MODEL_DIR.parent
    shipped = {p for pattern in patterns for p in tiny_root.glob(pattern)}
    files = {p for d in (MODEL_DIR, VERIFIER_DIR) for p in d.iterdir()}
    assert files and files <= shipped


def test_tokenizer_is_rebuilt_exactly_and_round_trips(tiny: LoadedModel) -> None:
    # The shipped vocabulary is what train.py builds, so the script reproduces it.
    rebuilt = json.loads(build_tokenizer().to_str())
    assert rebuilt == json.loads((MODEL_DIR / "tokenizer.json").read_text())
    tok = tiny.tokenizer
    for task in suite(n_per_kind=3, seed=HELD_OUT_SEED):
        assert tok.decode(tok.encode(task.answer)) == task.answer
        # Every answer fits the 32-token canvas bench/accuracy.py uses, with <|eot_id|>.
        assert len(tok.encode(task.answer)) <= 31
    # Words of the suite are one token each; numbers take four places, padded on the left.
    assert len(tok.encode("cherry river")) == 2
    assert len(tok.encode("42")) == len(tok.encode("1861")) == 4
    # Any other text falls back to characters, and decoding drops the number padding.
    for text in ("Hello, Zebra!", "12345 + 7 = 12352"):
        assert tok.decode(tok.encode(text)) == text
    assert {tok.token_to_id(s) for s in SPECIALS} == set(range(tok.vocab_size - 6, tok.vocab_size))


def test_training_rendering_is_the_chat_template(tiny: LoadedModel) -> None:
    raw = build_tokenizer()
    for task in suite(n_per_kind=2, seed=HELD_OUT_SEED):
        want = tiny.tokenizer.apply_chat_template([{"role": "user", "content": task.prompt}])
        assert raw.encode(render_chat(task.prompt), add_special_tokens=False).ids == want


def test_the_annealing_mask_runs_the_model_under_that_mask(tiny: LoadedModel) -> None:
    # Training anneals from causal to bidirectional attention through forward_with_mask.
    ids = torch.tensor([[5, 9, 14, 3, 7, 2]])
    everything = torch.ones(6, 6, dtype=torch.bool)
    with torch.no_grad():
        full = tiny.model(ids).logits
        assert torch.allclose(forward_with_mask(tiny.model, ids, everything), full, atol=1e-6)
        causal = forward_with_mask(tiny.model, ids, everything.tril())
    assert torch.allclose(causal[0, 0], tiny.model(ids[:, :1]).logits[0, 0], atol=1e-5)
    assert not torch.allclose(causal, full, atol=1e-3)


def test_training_stream_never_draws_a_held_out_prompt() -> None:
    excluded = excluded_prompts()
    held = suite(n_per_kind=25, seed=HELD_OUT_SEED)
    filtered = [t for t in held if t.kind not in UNFILTERED_KINDS]
    assert {t.prompt for t in filtered} <= excluded
    # The exceptions: 20 capitals, 100 sums and 55 differences of digits, nearly all of which
    # are in a held-out suite of some size.
    assert UNFILTERED_KINDS == {"capital", "add_digits", "sub_digits"}
    for stage, weights in (("main", None), ("digits", DIGITS_WEIGHTS)):
        drawn = list(islice(task_stream(0, excluded, weights), 20000))
        assert not {t.prompt for t in drawn if t.kind not in UNFILTERED_KINDS} & excluded, stage
    assert {t.kind for t in drawn} == {t.kind for t in held}


def test_held_out_accuracy_through_the_engine(tiny: LoadedModel) -> None:
    # The server's own engine and sampler (reference decoding, canvas 32 in one block), in
    # process: what a request gets, not what the training script's decoder gets.
    tasks = suite(n_per_kind=8, seed=HELD_OUT_SEED)
    outbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
    engine = Engine(
        tiny, Defaults(), outbox.put, max_num_seqs=len(tasks), max_queue_size=len(tasks)
    )
    engine.start()
    try:
        params = SamplingParams(
            max_tokens=32, block_length=32, temperature=0.0, decoding="reference"
        )
        for i, t in enumerate(tasks):
            messages = [{"role": "user", "content": t.prompt}]
            job = Generate(f"t{i}", "vdiff-tiny", messages=messages, params=params, stream=False)
            engine.submit(job)
        answers: dict[str, str] = {}
        while len(answers) < len(tasks):
            msg = outbox.get(timeout=120)
            assert isinstance(msg, Done), msg  # without streaming the whole answer is in it
            answers[msg.request_id] = msg.text
    finally:
        engine.stop()
    right = sum(answers[f"t{i}"].strip() == t.answer for i, t in enumerate(tasks))
    assert right / len(tasks) >= HELD_OUT_FLOOR


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # No --model: what `make serve` runs, with APD on (no --apd-verifier: vdiff-tiny-ar).
    server = start_allinone(tmp_path_factory.mktemp("tiny"), "--enable-apd")
    yield server
    for p in server.procs:
        p.stop()


def test_serve_without_model_answers_with_vdiff_tiny(default_server: Server) -> None:
    client = openai.OpenAI(base_url=default_server.url, api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["vdiff-tiny"]
    # The server's defaults: a 128-token canvas in 32-token blocks, threshold + dual cache.
    out = client.chat.completions.create(
        model="vdiff-tiny", messages=[{"role": "user", "content": "What is 12 + 30?"}]
    )
    assert out.choices[0].message.content == "42"
    assert out.choices[0].finish_reason == "stop"
    # Single digits are answered without a leading zero (the digits stage of train.py).
    for question, answer in (("What is 2 + 3?", "5"), ("What is 9 - 4?", "5")):
        out = client.chat.completions.create(
            model="vdiff-tiny", messages=[{"role": "user", "content": question}]
        )
        assert out.choices[0].message.content == answer


def test_apd_uses_the_built_in_verifier(default_server: Server) -> None:
    client = openai.OpenAI(base_url=default_server.url, api_key="unused", max_retries=0)
    out = client.chat.completions.create(
        model="vdiff-tiny",
        messages=[{"role": "user", "content": "What is 12 + 30?"}],
        extra_body={"decoding": "apd"},
    )
    assert out.choices[0].message.content == "42"
    # Drafting several tokens a round: fewer passes (draft + verify) than canvas tokens.
    assert out.usage is not None
    assert out.usage.model_extra is not None
    assert out.usage.model_extra["forward_passes"] < 32

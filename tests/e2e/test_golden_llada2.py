"""Token-exact parity with LLaDA2.0's `generate` and LLaDA2.1's editing `generate` through
the running server, with the block cache and without, in no more forward passes than the
reference made; chat through the OpenAI SDK on the checkpoint's own template."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from transformers import PreTrainedTokenizerFast

from tests.conftest import GOLDEN, Server, start_allinone

FIXTURE = json.loads((GOLDEN / "cases" / "shared_llada2.json").read_text())
CASES = FIXTURE["generate"]
EOS = FIXTURE["eos_token_id"]


@pytest.fixture(scope="module")
def llada2_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_allinone(
        tmp_path_factory.mktemp("llada2"), "--model", str(GOLDEN / "llada2-tiny")
    )
    yield server
    for p in server.procs:
        p.stop()


def answer(ids: list[int]) -> list[int]:
    """The reference's tokens before its first end token (the server stops there)."""
    return ids[: ids.index(EOS)] if EOS in ids else ids


def body(case: dict, cache: str) -> dict[str, object]:
    p = case["params"]
    out: dict[str, object] = {
        "model": "llada2-tiny",
        "prompt": case["prompt_ids"],
        "max_tokens": p["gen_length"],
        "block_length": p["block_length"],
        "threshold": p["threshold"],
        "temperature": p["temperature"],
        "cache": cache,
        "return_token_ids": True,
    }
    if case["task"] == "generate":
        out.update(decoding="reference", diffusion_steps=p["steps"])
    else:
        out.update(
            decoding="editing",
            editing_threshold=p["editing_threshold"],
            max_post_steps=p["max_post_steps"],
            num_to_transfer=p["num_to_transfer"],
        )
    return out


@pytest.mark.parametrize("cache", ["prefix", "none"])
@pytest.mark.parametrize("case", CASES, ids=[c["case_id"] for c in CASES])
def test_llada2_case(llada2_server: Server, case: dict, cache: str) -> None:
    r = httpx.post(llada2_server.url + "/completions", json=body(case, cache), timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["token_ids"] == answer(case["output_ids"])
    assert out["usage"]["forward_passes"] <= case["nfe"]


def test_chat_on_the_checkpoint_template(llada2_server: Server) -> None:
    client = openai.OpenAI(base_url=llada2_server.url, api_key="none")
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    out = client.chat.completions.create(
        model="llada2-tiny", messages=messages, max_tokens=40, extra_body={"block_length": 8}
    )
    tok = httpx.post(
        llada2_server.base + "/tokenize",
        json={"model": "llada2-tiny", "messages": messages},
        timeout=60,
    ).json()
    # The checkpoint's own template: the HUMAN turn, then ASSISTANT's to answer.
    reference = PreTrainedTokenizerFast.from_pretrained(str(GOLDEN / "llada2-tiny"))
    text = "<role>HUMAN</role>What is 2 + 3?<|role_end|><role>ASSISTANT</role>"
    assert reference.decode(tok["tokens"]).endswith(text)
    assert tok["tokens"] == reference.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert out.usage is not None and out.usage.prompt_tokens == tok["count"]
    assert out.choices[0].message.content
    # Streamed, the same answer arrives in pieces that concatenate to it.
    stream = client.chat.completions.create(
        model="llada2-tiny",
        messages=messages,
        max_tokens=40,
        stream=True,
        extra_body={"block_length": 8},
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == out.choices[0].message.content


def test_only_finished_blocks_are_streamed_while_editing(llada2_server: Server) -> None:
    case = next(c for c in CASES if c["task"] == "generate_editing")
    req = {**body(case, "prefix"), "stream": True, "eos_early_stop": False}
    chunks: list[list[int]] = []
    with httpx.stream("POST", llada2_server.url + "/completions", json=req, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ids = json.loads(line[6:])["choices"][0].get("token_ids") or []
                if ids:
                    chunks.append(ids)
    P, block = len(case["prompt_ids"]), case["params"]["block_length"]
    # Each chunk ends at a block boundary of the whole context (blocks count from position 0).
    ends = [P + sum(len(c) for c in chunks[: i + 1]) for i in range(len(chunks))]
    assert all(e % block == 0 for e in ends[:-1]), ends
    assert sum(chunks, []) == answer(case["output_ids"])


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"cache": "dual"}, "cache"),
        ({"decoding": "editing", "diffusion_steps": 8}, "diffusion_steps"),
        ({"decoding": "reference", "editing_threshold": 0.5}, "editing_threshold"),
        ({"decoding": "threshold"}, "decoding"),
        ({"remasking": "random"}, "remasking"),
    ],
)
def test_fields_that_do_not_apply_are_refused(
    llada2_server: Server, fields: dict[str, object], param: str
) -> None:
    req = {"model": "llada2-tiny", "prompt": "hi", "max_tokens": 8, **fields}
    r = httpx.post(llada2_server.url + "/completions", json=req, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# Chats whose answers hold characters of several bytes, each byte a token of llada2-tiny's
# byte-level tokenizer: (message, threshold, block_length), found by decoding many.
MULTIBYTE = [
    ("What is 2 + 3?", 0.9, 8),
    ("cats", 0.3, 4),
    ("river moon", 0.5, 8),
    ("balls and houses", 0.5, 8),
    ("19 + 22", 0.3, 8),
    ("How many?", 0.9, 4),
    ("The answer", 0.9, 8),
]


def test_partial_characters_are_held_back_while_streaming(llada2_server: Server) -> None:
    # A character's bytes are committed in different passes: the stream holds back a
    # trailing byte that may start one, so its pieces add up to the whole answer's text.
    client = openai.OpenAI(base_url=llada2_server.url, api_key="none")
    multibyte = 0
    for message, threshold, block in MULTIBYTE:
        fields: dict[str, Any] = {
            "model": "llada2-tiny",
            "messages": [{"role": "user", "content": message}],
            "max_tokens": 48,
            "extra_body": {"block_length": block, "threshold": threshold},
        }
        whole = client.chat.completions.create(**fields).choices[0].message.content or ""
        stream = client.chat.completions.create(**fields, stream=True)
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert "".join(pieces) == whole, message
        multibyte += any(ord(ch) > 127 and ch != "\ufffd" for ch in whole)
    assert multibyte == len(MULTIBYTE)


def test_a_default_decoding_the_model_lacks_stops_the_worker() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vdiff_worker", "--model", str(GOLDEN / "llada-tiny")]
        + ["--decoding", "editing"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--decoding editing: decoding 'editing' is not available for llada models" in (
        done.stdout + done.stderr
    )

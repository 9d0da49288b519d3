"""Tokenizers of the golden checkpoints: chat templates reproduce the reference prompts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vdiff_worker.tokenizer import Tokenizer, TokenizerError

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"

LLADA_USER = re.compile(r"<\|start_header_id\|>user<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.S)
QWEN_USER = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.S)


def _golden_prompts(case_file: str) -> list[list[int]]:
    data = json.loads((GOLDEN / "cases" / case_file).read_text())
    prompts = {tuple(e["prompt_ids"]) for e in data["generate"] if "prompt_ids" in e}
    for entry in data["generate"]:
        prompts.update(tuple(p) for p in entry.get("batch_prompt_ids", []))
    return [list(p) for p in sorted(prompts)]


@pytest.mark.parametrize(
    ("checkpoint", "case_file", "user_turn"),
    [
        ("llada-tiny", "shared_llada.json", LLADA_USER),
        ("dream-tiny", "shared_dream.json", QWEN_USER),
    ],
)
def test_chat_template_reproduces_golden_prompts(
    checkpoint: str, case_file: str, user_turn: re.Pattern[str]
) -> None:
    tok = Tokenizer.from_pretrained(str(GOLDEN / checkpoint))
    prompts = _golden_prompts(case_file)
    assert prompts
    for ids in prompts:
        match = user_turn.search(tok.decode(ids, skip_special_tokens=False))
        assert match is not None
        assert tok.apply_chat_template([{"role": "user", "content": match.group(1)}]) == ids


def test_llada_special_tokens() -> None:
    tok = Tokenizer.from_pretrained(str(GOLDEN / "llada-tiny"), extra_eos_ids=[481])
    assert tok.eos_token_ids == {481}
    assert tok.eot_token_ids == {485}
    assert tok.stop_token_ids == {481, 485}
    assert tok.vocab_size == 486
    assert tok.token_to_id("<|mdm_mask|>") == 482
    assert tok.token_to_id("<|no such token|>") is None


def test_dream_special_tokens() -> None:
    tok = Tokenizer.from_pretrained(str(GOLDEN / "dream-tiny"))
    assert tok.eos_token_ids == {480}
    assert tok.eot_token_ids == {482}
    assert tok.token_to_id("<|mask|>") == 484
    assert tok.vocab_size == 485


@pytest.mark.parametrize("checkpoint", ["llada-tiny", "dream-tiny"])
def test_encode_decode_round_trip(checkpoint: str) -> None:
    tok = Tokenizer.from_pretrained(str(GOLDEN / checkpoint))
    text = "What is 24 + 1?"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # Special tokens (end of turn, EOS) vanish from decoded answers.
    eot = next(iter(tok.eot_token_ids))
    eos = next(iter(tok.eos_token_ids))
    assert tok.decode([*ids, eot, eos]) == text


def test_chat_template_override(tmp_path: Path) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    tok = Tokenizer.from_pretrained(str(GOLDEN / "dream-tiny"), chat_template=str(template))
    assert tok.decode(tok.apply_chat_template([{"role": "user", "content": "hi"}])) == "[hi]"
    inline = Tokenizer.from_pretrained(
        str(GOLDEN / "dream-tiny"), chat_template="<{{ messages | length }}>"
    )
    assert inline.decode(inline.apply_chat_template([{"role": "user", "content": "x"}])) == "<1>"


def test_missing_template_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="chat template file"):
        Tokenizer.from_pretrained(str(GOLDEN / "dream-tiny"), chat_template=str(tmp_path / "x"))
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_pretrained(str(tmp_path / "nothing"))

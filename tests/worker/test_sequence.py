"""One choice's output rules, in-process: stop token ids, stop strings, partial characters."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import GOLDEN
from vdiff_worker.decoding.base import Context, Forward, Settings, Steps, Strategy
from vdiff_worker.models.base import ModelOutput
from vdiff_worker.sequence import Sequence
from vdiff_worker.tokenizer import Tokenizer

MASK = 484


class Scripted(Strategy):
    """Commits the next token ids of a script after each pass."""

    name, kinds = "reference", ("dream",)
    script: list[list[int]] = []

    def run(self) -> Steps:
        at = 0
        for ids in self.script:
            yield Forward(input_ids=self.ctx.prompt[None], position_ids=self.ctx.prompt[None])
            self.ctx.canvas[at : at + len(ids)] = torch.tensor(ids)
            at += len(ids)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(str(GOLDEN / "dream-tiny"))


def _run(
    tok: Tokenizer,
    script: list[list[int]],
    stop: list[str] | None = None,
    stop_ids: frozenset[int] = frozenset(),
) -> tuple[list[str], Sequence]:
    """Step the sequence through its script; the text of each chunk, and the sequence."""
    n = sum(len(s) for s in script)
    settings = Settings(gen_length=n, steps=1, block_length=n, temperature=0.0)
    ctx = Context(
        prompt=torch.tensor([1, 2]), settings=settings, mask_id=MASK, generator=torch.Generator()
    )
    strategy = Scripted(ctx)
    strategy.script = script
    seq = Sequence(
        request_id="r",
        index=0,
        ctx=ctx,
        strategy=strategy,
        tokenizer=tok,
        stop_ids=stop_ids,
        stop_strings=stop or [],
        early_stop=True,
    )
    chunks = []
    while not seq.done:
        seq.advance(ModelOutput(logits=torch.empty(0)))
        seq.collect()
        if (c := seq.chunk()) is not None:
            chunks.append(c.text)
    return chunks, seq


def test_a_partial_character_is_held_back_until_it_is_whole(tok: Tokenizer) -> None:
    ids = tok.encode("hi 😀!")
    emoji = [i for i in ids if "\ufffd" in tok.decode([i])]
    assert len(emoji) >= 2  # the emoji's bytes span several tokens
    chunks, seq = _run(tok, [[i] for i in ids])
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) + seq.result().text == "hi 😀!"


def test_a_stop_string_ends_the_answer_before_it_even_across_chunks(tok: Tokenizer) -> None:
    ids = tok.encode("one two three four")
    chunks, seq = _run(tok, [[i] for i in ids], stop=["three"])
    done = seq.result()
    assert "".join(chunks) + done.text == "one two "
    assert done.finish_reason == "stop"


def test_a_stop_token_id_ends_the_answer_and_is_not_returned(tok: Tokenizer) -> None:
    ids = tok.encode("one two three")
    chunks, seq = _run(tok, [ids[:2], ids[2:]], stop_ids=frozenset({ids[2]}))
    done = seq.result()
    assert [*seq.tokens] == ids[:2] and done.finish_reason == "stop"
    assert "".join(chunks) + done.text == tok.decode(ids[:2])
    assert done.completion_tokens == 3  # the stop token counts, as in vLLM


def test_without_a_stop_the_whole_canvas_is_the_answer(tok: Tokenizer) -> None:
    ids = tok.encode("one two three")
    chunks, seq = _run(tok, [ids[:1], ids[1:]])
    done = seq.result()
    assert done.finish_reason == "length" and seq.tokens == ids
    assert "".join(chunks) + done.text == "one two three"

"""One choice of one request: its strategy's step generator and what it has committed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from torch import Tensor

from vdiff_common.protocol import Chunk, Done, FinishReason
from vdiff_worker.decoding.base import Context, Forward, Step, Strategy
from vdiff_worker.models.base import ModelOutput
from vdiff_worker.tokenizer import Tokenizer


@dataclass
class Sequence:
    request_id: str
    index: int
    ctx: Context
    strategy: Strategy
    tokenizer: Tokenizer
    stop_ids: frozenset[int]
    stop_strings: list[str]
    early_stop: bool
    stream: bool = True  # send each step's new text; otherwise all of it in the Done
    deadline: float | None = None
    arrived: float = field(default_factory=time.perf_counter)  # when the worker got the job
    forward_passes: int = 0
    tokens: list[int] = field(default_factory=list)  # committed answer before any stop token
    text_sent: str = ""  # text released so far (held back: a partial character or stop)
    unsent_text: str = ""  # released but not yet in a Chunk
    unsent_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None  # set when the answer is final
    stopped_by_token: bool = False
    pending: Step | None = None  # the strategy's next model call or host fetch
    slots: dict[str, int] = field(default_factory=dict)  # cache slot per model, while running
    waited: bool = False  # its pass was held back a step for another model's (engine._due)

    def __post_init__(self) -> None:
        self._steps = self.strategy.run()
        self._scanned = 0  # canvas positions already looked at
        self.pending = next(self._steps, None)

    @property
    def prompt_tokens(self) -> int:
        return int(self.ctx.prompt.numel())

    @property
    def done(self) -> bool:
        """Nothing more to compute: the strategy ended, or the answer is final (after a stop
        token only with early stop; with it off the whole canvas is decoded, as the reference)."""
        final = self.finish_reason is not None and (self.early_stop or not self.stopped_by_token)
        return self.pending is None or final

    def committed(self) -> int:
        return int((self.ctx.canvas != self.ctx.mask_id).sum())

    def advance(self, result: ModelOutput | tuple[Tensor, ...]) -> None:
        """Hand the pending step its result: a model call's output, a fetch's host copies."""
        assert self.pending is not None
        if isinstance(self.pending, Forward):
            self.forward_passes += int(self.pending.input_ids.shape[0])
        try:
            self.pending = self._steps.send(result)
        except StopIteration:
            self.pending = None

    def close(self) -> None:
        self._steps.close()
        self.pending = None

    def collect(self) -> None:
        """Release new text committed contiguously from the left (and settled, where the
        strategy may still edit), with stop tokens/strings applied; it waits in `unsent_*`
        for the next Chunk or the Done."""
        if self.finish_reason is not None:
            return
        canvas = self.ctx.canvas.tolist()
        mask = self.ctx.mask_id
        settled = self.strategy.settled
        final = len(canvas) if settled is None else settled
        new: list[int] = []
        while self._scanned < final and canvas[self._scanned] != mask:
            tok = canvas[self._scanned]
            self._scanned += 1
            if tok in self.stop_ids:
                self.finish_reason = "stop"
                self.stopped_by_token = True
                break
            new.append(tok)
        self.tokens += new
        if self.finish_reason is None and self._scanned == len(canvas):
            self.finish_reason = "length"
        text = self.tokenizer.decode(self.tokens)
        for stop in self.stop_strings:
            at = text.find(stop)
            if at != -1:
                text = text[:at]
                self.finish_reason = "stop"
        if self.finish_reason is None:
            # Hold back what may be an unfinished character or the start of a stop string.
            hold = max((len(s) - 1 for s in self.stop_strings), default=0)
            cut = len(text) - hold
            while cut > len(self.text_sent) and text[cut - 1] == "\ufffd":
                cut -= 1
            text = text[: max(cut, len(self.text_sent))]
        delta = text[len(self.text_sent) :] if text.startswith(self.text_sent) else ""
        self.text_sent += delta
        self.unsent_text += delta
        self.unsent_ids += new

    def take(self) -> tuple[str, list[int]]:
        text, ids = self.unsent_text, self.unsent_ids
        self.unsent_text, self.unsent_ids = "", []
        return text, ids

    def chunk(self) -> Chunk | None:
        """What was released since the last Chunk, if anything."""
        if not self.unsent_text and not self.unsent_ids:
            return None
        text, ids = self.take()
        return Chunk(request_id=self.request_id, index=self.index, text=text, token_ids=ids)

    def result(self, finish_reason: FinishReason | None = None) -> Done:
        """The end of this choice, carrying whatever no Chunk did."""
        text, ids = self.take()
        return Done(
            request_id=self.request_id,
            index=self.index,
            finish_reason=finish_reason or self.finish_reason or "length",
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.tokens) + int(self.stopped_by_token),
            forward_passes=self.forward_passes,
            worker_s=time.perf_counter() - self.arrived,
            text=text,
            token_ids=ids,
        )

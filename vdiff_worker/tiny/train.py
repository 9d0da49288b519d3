"""Train the built-in models: vdiff-tiny (LLaDA masked diffusion) and vdiff-tiny-ar (its verifier).

    .venv/bin/python -m vdiff_worker.tiny.train --threads 2                  # 41 min
    .venv/bin/python -m vdiff_worker.tiny.train --threads 1 --stage polish   # 21 min
    .venv/bin/python -m vdiff_worker.tiny.train --threads 1 --stage polish   # again, 21 min
    .venv/bin/python -m vdiff_worker.tiny.train --threads 1 --stage digits   # 21 min

These four commands made the shipped weights in vdiff_worker/tiny/ (times on the 2-core CPU
this repository is developed on). Run them from a repository checkout: the training data is
the task suite of ``tasks.py`` beside it, drawn from seeds disjoint from ``HELD_OUT_SEED``,
with every prompt of the held-out suite removed. They are reproducible: same seed, same machine,
same weights.

Why it looks the way it does (a 2-core, about-an-hour budget):

- The tokenizer is word-level with a character fallback: every word of the suite is one
  token (with or without its leading space), digits are single tokens, and any other text
  falls back to single characters. Copying words is then one token per word. Numbers are
  right-aligned: the tokenizer's normalizer left-pads them to four places with a character
  its decoder drops, so equal place values line up (carries and comparisons become local).
  The longest answer is 24 tokens, so a 32-token canvas holds every answer.
- vdiff-tiny-ar (Qwen2 layout, transformers) is trained first with next-token prediction,
  which converges much faster than masked diffusion. vdiff-tiny starts from its weights (the
  two layouts are the same network up to names; LLaDA's ``include_qkv_bias`` carries Qwen2's
  q/k/v biases), as Dream was initialised from Qwen, then trains on LLaDA's SFT objective: the
  prompt stays clean, answer + <|eot_id|> + <|endoftext|> padding is masked at ratio
  t ~ U(0, 1), and the loss on masked tokens is weighted 1/t. Its attention is annealed from
  the verifier's causal mask to full over the first 500 steps (as when Dream and DiffuLLaMA
  adapt an AR model): without it the diffusion model first unlearns what it inherited.
- The polish stage continues vdiff-tiny at a lower rate on a mix weighted toward the kinds it
  still missed (repeat, count, sort); run twice, it took held-out exact answers from 85% to
  88.5% and then 90%. The digits stage is the same mix with single-digit sums and
  differences, which the earlier stages never drew: "What is 2 + 3?" had been "05".
- Canvas lengths vary per batch, mostly short (what the benchmark uses) with a share up to 136
  tokens, so the server's default 128-token canvas also decodes cleanly.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as RawTokenizer
from tokenizers.models import BPE
from torch import Tensor, nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from vdiff_worker.decoding.base import Context, Fetch, Forward, Settings, Steps
from vdiff_worker.decoding.llada import LLaDAReference
from vdiff_worker.models.base import ModelOutput
from vdiff_worker.models.llada import LLaDAConfig, LLaDAModel
from vdiff_worker.models.packing import checkpoint_state, load_checkpoint_state
from vdiff_worker.tiny.tasks import CAPITALS, HELD_OUT_SEED, KINDS, TIMES, WORDS, Task, suite
from vdiff_worker.tokenizer import Tokenizer

HERE = Path(__file__).resolve().parent
MDM_NAME, AR_NAME = "vdiff-tiny", "vdiff-tiny-ar"

BOS, EOS, MASK = "<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
SPECIALS = [BOS, EOS, MASK, START_HEADER, END_HEADER, EOT]
# LLaDA-8B-Instruct's chat template, as its tokenizer_config.json inlines it.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)
# Numbers of one to three digits are left-padded to four places with this (private use)
# character, which decoding removes: "12 + 30" is read as "__12 + __30" and "42" is written
# "__42". Digits of equal place value then sit at equal offsets in every number, which is what
# lets a model this small learn carries and comparisons in its budget.
DIGIT_PAD = "\ue000"
NUMBER_WIDTH = 4
# Words (optionally space-led), single digits or pads, single punctuation, newlines, spaces.
PRE_TOKENIZE = rf" ?[A-Za-z]+| ?[0-9{DIGIT_PAD}]| ?[^A-Za-z0-9\s{DIGIT_PAD}]|\n+|\s"

# Seeds of the data streams; none may equal HELD_OUT_SEED.
VOCAB_SEED, VALID_SEED = 1, 2
# Arithmetic, sorting and comparison need far more examples than recall and copying.
KIND_WEIGHTS = {
    "add": 3.0,
    "sub": 3.0,
    "sort": 2.0,
    "max": 2.0,
    "count": 2.0,
    "reverse": 1.0,
    "repeat": 1.0,
    "capital": 1.0,
}
# There are only 20 capital questions and 100 (55) sums (differences) of single digits, so
# nearly all of them are in a held-out suite of some size: those kinds measure recall, not
# generalisation, and are the kinds not filtered.
UNFILTERED_KINDS = frozenset({"capital", "add_digits", "sub_digits"})
# The polish stage: where the diffusion model trails its verifier after the main stage, the
# kinds whose answer length must be counted out (repeat, count) and sorting.
POLISH_WEIGHTS = {
    "add": 1.0,
    "sub": 1.0,
    "sort": 2.0,
    "max": 1.0,
    "count": 3.0,
    "reverse": 1.0,
    "repeat": 3.0,
    "capital": 0.5,
}
# The digits stage: the polish mix with sums and differences of single digits, which the
# earlier stages never drew (sums of two 0-999 numbers almost never have one digit, so the
# model wrote a 0 where a number's pad belongs: "What is 2 + 3?" -> "05").
DIGITS_WEIGHTS = {**POLISH_WEIGHTS, "add_digits": 0.5, "sub_digits": 0.5}


@dataclass(frozen=True)
class Arch:
    d_model: int = 128
    n_layers: int = 6
    n_heads: int = 4
    mlp_hidden: int = 384
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_len: int = 1024


# ---- tokenizer ---------------------------------------------------------------------------


def number_padding() -> normalizers.Normalizer:
    """Left-pad every 1- to 3-digit number to NUMBER_WIDTH places with DIGIT_PAD."""
    steps = []
    for digits in range(1, NUMBER_WIDTH):
        # Zero-width match in front of a number of exactly ``digits`` digits; the look-behind
        # skips numbers an earlier step already padded.
        at = rf"(?<![0-9{DIGIT_PAD}])(?=[0-9]{{{digits}}}(?![0-9]))"
        steps.append(normalizers.Replace(Regex(at), DIGIT_PAD * (NUMBER_WIDTH - digits)))
    return normalizers.Sequence(steps)


def build_tokenizer() -> RawTokenizer:
    """A word-level vocabulary over the suite, with single characters as the fallback.

    A BPE model without merges and with ``ignore_merges`` maps a pre-token that is in the
    vocabulary to that one token and splits any other into characters.
    """
    pad = number_padding()
    pre = pre_tokenizers.Split(Regex(PRE_TOKENIZE), behavior="isolated")
    pieces: set[str] = set()
    texts = [s for t in suite(n_per_kind=200, seed=VOCAB_SEED) for s in (t.prompt, t.answer)]
    texts += [*WORDS, *CAPITALS, *CAPITALS.values(), *TIMES.values(), "user", "assistant"]
    for text in texts:
        for piece in (text, " " + text):
            pieces.update(p for p, _ in pre.pre_tokenize_str(pad.normalize_str(piece)))
    vocab: dict[str, int] = {}
    chars = [*(chr(c) for c in range(32, 127)), DIGIT_PAD, "\n", "\n\n"]
    for piece in [*chars, *sorted(pieces)]:
        vocab.setdefault(piece, len(vocab))
    tok = RawTokenizer(BPE(vocab=vocab, merges=[], ignore_merges=True))
    tok.normalizer = pad
    tok.pre_tokenizer = pre
    # Tokens carry their own spaces; the padding is dropped.
    tok.decoder = decoders.Sequence([decoders.Replace(DIGIT_PAD, ""), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


def save_tokenizer(tok: RawTokenizer, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(tok.token_to_id(s)): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for s in SPECIALS
    }
    config = {
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "clean_up_tokenization_spaces": False,
        "model_max_length": Arch.max_len,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(
        out / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS}
    )


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class Ids:
    bos: int
    eos: int
    mask: int
    eot: int
    vocab_size: int

    @classmethod
    def of(cls, tok: RawTokenizer) -> Ids:
        def get(s: str) -> int:
            i = tok.token_to_id(s)
            assert i is not None, s
            return int(i)

        return cls(get(BOS), get(EOS), get(MASK), get(EOT), tok.get_vocab_size())


def render_chat(prompt: str) -> str:
    """CHAT_TEMPLATE for one user turn, as text: tokenizing it is fast in batches."""
    return (
        f"{BOS}{START_HEADER}user{END_HEADER}\n\n{prompt.strip()}{EOT}"
        f"{START_HEADER}assistant{END_HEADER}\n\n"
    )


# ---- data --------------------------------------------------------------------------------


def excluded_prompts() -> frozenset[str]:
    """The held-out suite at every size up to 100 per kind (sizes change the draws), and the
    validation set."""
    tasks = [t for n in range(1, 101) for t in suite(n_per_kind=n, seed=HELD_OUT_SEED)]
    tasks += validation_tasks()
    return frozenset(t.prompt for t in tasks if t.kind not in UNFILTERED_KINDS)


def validation_tasks(n_per_kind: int = 12) -> list[Task]:
    return suite(n_per_kind=n_per_kind, seed=VALID_SEED)


def task_stream(
    seed: int, excluded: frozenset[str], kind_weights: dict[str, float] | None = None
) -> Iterator[Task]:
    r = random.Random(seed)
    table = kind_weights or KIND_WEIGHTS
    kinds, weights = list(table), list(table.values())
    while True:
        kind = r.choices(kinds, weights)[0]
        task = KINDS[kind](r)
        if task.kind in UNFILTERED_KINDS or task.prompt not in excluded:
            yield task


@dataclass
class Batch:
    input_ids: Tensor  # [B, T]
    answer_start: Tensor  # [B]: first position of the answer region
    answer_end: Tensor  # [B]: one past <|eot_id|> (AR loss stops after one <|endoftext|>)


class Batches:
    """Mixed-kind batches: chat prompt, answer, <|eot_id|>, then <|endoftext|> to length T.

    A batch holds about ``batch_size`` x 48 tokens: long canvases come in fewer rows, so every
    step costs about the same."""

    def __init__(
        self,
        tok: RawTokenizer,
        ids: Ids,
        seed: int,
        batch_size: int,
        excluded: frozenset[str],
        kind_weights: dict[str, float] | None = None,
    ) -> None:
        self.tok, self.ids, self.batch_size = tok, ids, batch_size
        self.tasks = task_stream(seed, excluded, kind_weights)
        self.r = random.Random(seed + 1)

    def next(self, canvas: int | None) -> Batch:
        """``canvas``: answer-region length of the longest prompt; None: just fit the answers."""
        rows = self.batch_size
        if canvas is not None:
            rows = max(8, min(rows, rows * 48 // (28 + canvas)))
        tasks = [next(self.tasks) for _ in range(rows)]
        prompts = self.tok.encode_batch(
            [render_chat(t.prompt) for t in tasks], add_special_tokens=False
        )
        answers = self.tok.encode_batch([t.answer for t in tasks], add_special_tokens=False)
        pairs = [(p.ids, [*a.ids, self.ids.eot]) for p, a in zip(prompts, answers)]
        width = max(len(p) + len(a) for p, a in pairs) + 1
        if canvas is not None:
            width = max(width, max(len(p) for p, _ in pairs) + canvas)
        x = torch.full((len(pairs), width), self.ids.eos, dtype=torch.long)
        for i, (p, a) in enumerate(pairs):
            x[i, : len(p) + len(a)] = torch.tensor(p + a)
        start = torch.tensor([len(p) for p, _ in pairs])
        end = torch.tensor([len(p) + len(a) for p, a in pairs])
        return Batch(x, start, end)

    def canvas(self) -> int:
        """Mostly canvases up to the benchmark's 32, sometimes up to the server's default 128."""
        return self.r.randint(14, 34) if self.r.random() < 0.8 else self.r.randint(34, 136)


# ---- models ------------------------------------------------------------------------------


def ar_config(arch: Arch, ids: Ids) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=ids.vocab_size,
        hidden_size=arch.d_model,
        intermediate_size=arch.mlp_hidden,
        num_hidden_layers=arch.n_layers,
        num_attention_heads=arch.n_heads,
        num_key_value_heads=arch.n_heads,
        max_position_embeddings=arch.max_len,
        rope_parameters={"rope_theta": arch.rope_theta, "rope_type": "default"},
        rms_norm_eps=arch.rms_norm_eps,
        tie_word_embeddings=False,
        bos_token_id=ids.bos,
        eos_token_id=ids.eos,
        pad_token_id=ids.eos,
        architectures=["Qwen2ForCausalLM"],
    )


def llada_config(arch: Arch, ids: Ids) -> dict[str, Any]:
    """config.json with LLaDA-8B-Instruct's keys (and remote-code names vdiff never runs)."""
    return {
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModel": "modeling_llada.LLaDAModelLM",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        },
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": arch.d_model,
        "embedding_dropout": 0.0,
        "embedding_size": ids.vocab_size,
        "eos_token_id": ids.eos,
        "flash_attention": False,
        "include_bias": False,
        # Carries the verifier's q/k/v biases, which initialise this model.
        "include_qkv_bias": True,
        "init_cutoff_factor": None,
        "init_device": "cpu",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": ids.mask,
        "max_sequence_length": arch.max_len,
        "mlp_hidden_size": arch.mlp_hidden,
        "mlp_ratio": arch.mlp_hidden // arch.d_model,
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": arch.n_heads,
        "n_kv_heads": arch.n_heads,
        "n_layers": arch.n_layers,
        "pad_token_id": ids.eos,
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": arch.rope_theta,
        "scale_logits": False,
        "torch_dtype": "float32",
        "transformers_version": "4.54.0",
        "use_cache": False,
        "vocab_size": ids.vocab_size,
        "weight_tying": False,
    }


# Qwen2 name -> LLaDA name ({i} is the layer); the two blocks compute the same function.
_AR_TO_LLADA = {
    "model.embed_tokens.weight": "model.transformer.wte.weight",
    "model.norm.weight": "model.transformer.ln_f.weight",
    "lm_head.weight": "model.transformer.ff_out.weight",
    "model.layers.{i}.input_layernorm.weight": "model.transformer.blocks.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": (
        "model.transformer.blocks.{i}.ff_norm.weight"
    ),
    "model.layers.{i}.self_attn.o_proj.weight": "model.transformer.blocks.{i}.attn_out.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "model.transformer.blocks.{i}.ff_proj.weight",
    "model.layers.{i}.mlp.up_proj.weight": "model.transformer.blocks.{i}.up_proj.weight",
    "model.layers.{i}.mlp.down_proj.weight": "model.transformer.blocks.{i}.ff_out.weight",
    **{
        f"model.layers.{{i}}.self_attn.{p}_proj.{w}": f"model.transformer.blocks.{{i}}.{p}_proj.{w}"
        for p in "qkv"
        for w in ("weight", "bias")
    },
}


def llada_from_ar(ar: Qwen2ForCausalLM, cfg: dict[str, Any]) -> LLaDAModel:
    model = LLaDAModel(LLaDAConfig.from_dict(cfg))
    names: dict[str, str] = {}
    for src, dst in _AR_TO_LLADA.items():
        for i in range(cfg["n_layers"]) if "{i}" in src else [0]:
            names[src.format(i=i)] = dst.format(i=i)
    load_checkpoint_state(model, {names[k]: v.detach() for k, v in ar.state_dict().items()})
    return model


def share_space_variants(model: Qwen2ForCausalLM, tok: RawTokenizer) -> None:
    """Start " word" at the embedding and output rows of "word" (digits and signs alike).

    Prompts carry words space-led and answers start without the space, so copying a word
    means mapping one token to the other; equal rows make that mapping free at the start."""
    vocab = tok.get_vocab()
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    with torch.no_grad():
        for piece, i in vocab.items():
            base = vocab.get(piece[1:]) if piece.startswith(" ") and len(piece) > 1 else None
            if base is not None:
                emb[i] = emb[base]
                head[i] = head[base]


# ---- objectives --------------------------------------------------------------------------


def ar_loss(model: Qwen2ForCausalLM, b: Batch, step: int = 0) -> Tensor:
    """Next-token loss on the answer, <|eot_id|> and one <|endoftext|>."""
    logits = model(input_ids=b.input_ids).logits[:, :-1].float()
    target = b.input_ids[:, 1:]
    pos = torch.arange(target.shape[1])
    keep = (pos[None] >= b.answer_start[:, None] - 1) & (pos[None] < b.answer_end[:, None])
    return F.cross_entropy(logits[keep], target[keep])


def mdm_loss(
    model: LLaDAModel, b: Batch, mask_id: int, gen: torch.Generator, future_share: float = 1.0
) -> Tensor:
    """LLaDA's SFT loss: mask the answer region at ratio t, weight masked tokens by 1/t,
    normalise by the region's length. t is stratified over the batch to cut variance.

    ``future_share`` < 1 anneals attention from the causal verifier it starts from to full
    bidirectional attention: each query sees the past and that share of the future."""
    x0 = b.input_ids
    rows, width = x0.shape
    eps = 1e-3
    t = (torch.randperm(rows, generator=gen) + torch.rand(rows, generator=gen)) / rows
    p_mask = (1 - eps) * t + eps
    region = torch.arange(width)[None] >= b.answer_start[:, None]
    masked = region & (torch.rand(rows, width, generator=gen) < p_mask[:, None])
    xt = torch.where(masked, mask_id, x0)
    if future_share >= 1.0:
        logits = model(xt).logits.float()
    else:
        seen = torch.rand(width, width, generator=gen) < future_share
        logits = forward_with_mask(model, xt, seen | torch.ones_like(seen).tril()).float()
    ce = F.cross_entropy(logits[masked], x0[masked], reduction="none")
    weight = (1.0 / p_mask[:, None] / region.sum(1, keepdim=True)).expand(rows, width)[masked]
    return (ce * weight).sum() / rows


def forward_with_mask(model: LLaDAModel, ids: Tensor, allowed: Tensor) -> Tensor:
    """Logits with a [T, T] query-by-key attention mask (True = attend), shared by the rows."""
    rows, width = ids.shape
    h = model.embed(ids)
    rope = model.rotary.tables(torch.arange(width).expand(rows, width), h.dtype)
    for i, block in enumerate(model.layers()):
        h = block(h, rope, allowed[None, None], None, i)
    return model.head(h)


# ---- evaluation (vdiff's own sampler, in-process) -------------------------------------------


@torch.no_grad()
def llada_decode(
    model: nn.Module, prompts: list[list[int]], mask_id: int, gen_length: int, block_length: int
) -> list[list[int]]:
    """LLaDA ``generate`` at temperature 0, one token per step, through vdiff's sampler.

    The prompts run in lockstep as one right-padded batch (padded keys masked, as the
    engine batches them); the settings are shared, so every run makes the same calls."""
    settings = Settings(
        gen_length=gen_length, steps=gen_length, block_length=block_length, temperature=0.0
    )
    ctxs = [
        Context(
            prompt=torch.tensor(p), settings=settings, mask_id=mask_id, generator=torch.Generator()
        )
        for p in prompts
    ]
    runs = [LLaDAReference(c).run() for c in ctxs]
    calls = {i: _call(r, next(r)) for i, r in enumerate(runs)}
    while calls:
        width = max(int(c.input_ids.shape[1]) for c in calls.values())
        lengths = [int(c.input_ids.shape[1]) for c in calls.values()]
        ids = torch.stack(
            [
                F.pad(c.input_ids[0], (0, width - n), value=mask_id)
                for c, n in zip(calls.values(), lengths)
            ]
        )
        pos = torch.arange(width).expand(len(calls), width)
        keys = pos < torch.tensor(lengths)[:, None]
        logits = model(ids, position_ids=pos, key_mask=keys).logits
        for row, i in enumerate(list(calls)):
            lo, hi = calls[i].span
            try:
                out = ModelOutput(logits=logits[row : row + 1, lo:hi])
                calls[i] = _call(runs[i], runs[i].send(out))
            except StopIteration:
                del calls[i]
    return [[int(t) for t in c.canvas] for c in ctxs]


def _call(run: Steps, step: Forward | Fetch) -> Forward:
    """The run's next model call; its fetches are answered at once (all of it is on the CPU)."""
    while isinstance(step, Fetch):
        step = run.send(step.tensors)
    return step


@torch.no_grad()
def ar_decode(
    model: Qwen2ForCausalLM, prompt: list[int], stop: frozenset[int], max_new: int = 16
) -> list[int]:
    ids = list(prompt)
    for _ in range(max_new):
        nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        if nxt in stop:
            break
    return ids[len(prompt) :]


def answer_text(tok: RawTokenizer, out: Sequence[int], stop: frozenset[int]) -> str:
    cut = next((i for i, t in enumerate(out) if t in stop), len(out))
    return tok.decode(list(out[:cut]), skip_special_tokens=True)


def accuracy(tok: RawTokenizer, tasks: list[Task], answers: list[str]) -> dict[str, float]:
    by_kind: dict[str, list[bool]] = {}
    for task, ans in zip(tasks, answers):
        by_kind.setdefault(task.kind, []).append(ans.strip() == task.answer)
    acc = {k: sum(v) / len(v) for k, v in by_kind.items()}
    acc["all"] = sum(sum(v) for v in by_kind.values()) / len(tasks)
    return acc


def fmt(acc: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in acc.items())


# ---- training loops ----------------------------------------------------------------------


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: nn.Module,
    loss_fn: Any,
    batches: Batches,
    steps: int,
    peak_lr: float,
    evaluate: Any,
    eval_every: int,
    label: str,
    long_canvas: bool,
) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.98), weight_decay=0.01)
    t0, smooth = time.monotonic(), 0.0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr, warmup=min(200, steps // 10))
        model.train()
        batch = batches.next(batches.canvas() if long_canvas else None)
        # bfloat16 matmuls run about twice as fast as float32 on this CPU; weights, optimizer
        # state and the loss stay float32.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model, batch, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = float(loss.detach())
        smooth = 0.98 * smooth + 0.02 * value if step else value
        if (step + 1) % 50 == 0:
            print(
                f"[{label}] step {step + 1}/{steps} loss {smooth:.4f} {time.monotonic() - t0:.0f}s",
                flush=True,
            )
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            model.eval()
            print(
                f"[{label}] eval @ {step + 1}: {evaluate(model)} {time.monotonic() - t0:.0f}s",
                flush=True,
            )


# ---- saving ------------------------------------------------------------------------------


def save_common(out: Path, tok: RawTokenizer, ids: Ids) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tok, out)
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": ids.bos, "eos_token_id": [ids.eos, ids.eot], "pad_token_id": ids.eos},
    )


def save_llada(model: LLaDAModel, cfg: dict[str, Any], out: Path) -> None:
    state = {k: v.contiguous() for k, v in checkpoint_state(model).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", cfg)


# ---- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=HERE, help="writes OUT/vdiff-tiny{,-ar}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--ar-steps", type=int, default=2000)
    ap.add_argument("--mdm-steps", type=int, default=5000)
    ap.add_argument(
        "--anneal-steps",
        type=int,
        default=500,
        help="diffusion steps over which attention goes from causal to full",
    )
    ap.add_argument("--ar-lr", type=float, default=2e-3)
    ap.add_argument("--mdm-lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--stage",
        choices=["main", "polish", "digits"],
        default="main",
        help="main: the verifier, then vdiff-tiny from it; polish, digits: continue "
        "OUT/vdiff-tiny on POLISH_WEIGHTS, DIGITS_WEIGHTS (run them after main)",
    )
    ap.add_argument("--polish-steps", type=int, default=2000)
    ap.add_argument("--polish-lr", type=float, default=3e-4)
    args = ap.parse_args(argv)
    # The task streams of the stages; the held-out prompts are filtered out besides.
    streams = {
        "ar": args.seed * 1000 + 11,
        "mdm": args.seed * 1000 + 22,
        "polish": args.seed * 1000 + 33,
        "digits": args.seed * 1000 + 44,
    }
    if set(streams.values()) & {HELD_OUT_SEED, VALID_SEED, VOCAB_SEED}:
        ap.error("this --seed draws training data from a held-out or validation seed")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    arch = Arch()

    tok = build_tokenizer()
    ids = Ids.of(tok)
    mdm_dir, ar_dir = args.out / MDM_NAME, args.out / AR_NAME
    for d in (mdm_dir, ar_dir):
        save_common(d, tok, ids)
    check_template(mdm_dir, tok)
    excluded = excluded_prompts()
    valid = validation_tasks()
    valid_prompts = [
        e.ids
        for e in tok.encode_batch([render_chat(t.prompt) for t in valid], add_special_tokens=False)
    ]
    stop = frozenset({ids.eos, ids.eot})
    print(
        f"vocabulary {ids.vocab_size}, {len(excluded)} held-out/validation prompts excluded",
        flush=True,
    )

    def eval_ar(m: nn.Module) -> str:
        assert isinstance(m, Qwen2ForCausalLM)
        answers = [answer_text(tok, ar_decode(m, p, stop), stop) for p in valid_prompts]
        return fmt(accuracy(tok, valid, answers))

    cfg = llada_config(arch, ids)

    def eval_mdm(m: nn.Module) -> str:
        assert isinstance(m, LLaDAModel)
        short = [
            answer_text(tok, out, stop) for out in llada_decode(m, valid_prompts, ids.mask, 32, 32)
        ]
        # The server's defaults (128-token canvas, 32-token blocks) on a twelfth of the set.
        sub = list(range(0, len(valid), 12))
        long = [
            answer_text(tok, out, stop)
            for out in llada_decode(m, [valid_prompts[i] for i in sub], ids.mask, 128, 32)
        ]
        # Saved at every evaluation, so a run stopped early leaves its latest model.
        save_llada(m, cfg, mdm_dir)
        return (
            f"canvas32 {fmt(accuracy(tok, valid, short))} | canvas128 "
            f"{fmt(accuracy(tok, [valid[i] for i in sub], long))}"
        )

    t0 = time.monotonic()
    if args.stage in ("polish", "digits"):
        polished = LLaDAModel(LLaDAConfig.from_dict(cfg))
        load_checkpoint_state(polished, load_file(str(mdm_dir / "model.safetensors")))
        weights = POLISH_WEIGHTS if args.stage == "polish" else DIGITS_WEIGHTS
        batches = Batches(tok, ids, streams[args.stage], args.batch_size, excluded, weights)
        train(
            polished,
            lambda m, b, step: mdm_loss(m, b, ids.mask, gen),
            batches,
            args.polish_steps,
            args.polish_lr,
            eval_mdm,
            args.eval_every,
            args.stage,
            long_canvas=True,
        )
        save_llada(polished, cfg, mdm_dir)
        print(f"saved {mdm_dir}; total {time.monotonic() - t0:.0f}s", flush=True)
        return
    ar = Qwen2ForCausalLM(ar_config(arch, ids))
    share_space_variants(ar, tok)
    train(
        ar,
        ar_loss,
        Batches(tok, ids, streams["ar"], args.batch_size, excluded),
        args.ar_steps,
        args.ar_lr,
        eval_ar,
        args.eval_every,
        "ar",
        long_canvas=False,
    )
    ar.eval()
    ar.save_pretrained(str(ar_dir))
    save_common(ar_dir, tok, ids)  # save_pretrained rewrote generation_config.json
    print(f"saved {ar_dir} after {time.monotonic() - t0:.0f}s", flush=True)

    mdm = llada_from_ar(ar, cfg)
    del ar

    def loss_mdm(m: nn.Module, b: Batch, step: int) -> Tensor:
        assert isinstance(m, LLaDAModel)
        return mdm_loss(m, b, ids.mask, gen, min(1.0, step / max(1, args.anneal_steps)))

    train(
        mdm,
        loss_mdm,
        Batches(tok, ids, streams["mdm"], args.batch_size, excluded),
        args.mdm_steps,
        args.mdm_lr,
        eval_mdm,
        args.eval_every,
        "mdm",
        long_canvas=True,
    )
    save_llada(mdm, cfg, mdm_dir)
    print(f"saved {mdm_dir}; total {time.monotonic() - t0:.0f}s", flush=True)


def check_template(model_dir: Path, tok: RawTokenizer) -> None:
    """The fast training-time rendering must equal what the server's chat template gives."""
    served = Tokenizer.from_pretrained(str(model_dir))
    for t in validation_tasks(n_per_kind=2):
        want = served.apply_chat_template([{"role": "user", "content": t.prompt}])
        got = tok.encode(render_chat(t.prompt), add_special_tokens=False).ids
        if want != got:
            raise RuntimeError(f"chat rendering differs from the template for {t.prompt!r}")


if __name__ == "__main__":
    main()

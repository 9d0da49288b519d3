"""APD against the reference's acceptance counts, its cap, its refusals and its flags."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from tests.worker.test_decoding_fastdllm import drive
from vdiff_worker.cli import build_parser, check_decoding_flags, load_verifier
from vdiff_worker.decoding import strategy_for
from vdiff_worker.decoding.base import Context, ParamError, Settings
from vdiff_worker.models import LoadedModel, load_model
from vdiff_worker.tiny import MODEL_DIR, VERIFIER_DIR

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
CASES = json.loads((GOLDEN / "cases" / "shared_apd.json").read_text())["apd"]
EOS, MASK = 480, 484
BOTH = frozenset({"main", "verifier"})


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {
        "main": load_model(str(GOLDEN / "dream-tiny")).model,
        "verifier": load_model(str(GOLDEN / "ar-tiny")).model,
    }


def settings(**kw: object) -> Settings:
    base: dict[str, object] = dict(
        gen_length=32, steps=32, block_length=32, temperature=0.0, models=BOTH
    )
    return Settings(**{**base, **kw})  # type: ignore[arg-type]


def rounds(ctx: Context, models: dict[str, torch.nn.Module], until_eos: bool = True) -> list[int]:
    """Tokens accepted per round (a round = a draft pass and a verifier pass)."""
    per_pass: list[int] = []
    drive(
        strategy_for("dream", "apd")(ctx),
        models,
        per_pass,
        until=(lambda c: bool((c == EOS).any())) if until_eos else None,
    )
    return per_pass[1::2]


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: (
        "R{apd_mixture_weight}-W{kv_window}-M{max_lookahead}-".format(**c["params"]) + c["task"]
    ),
)
def test_reference_tokens_and_acceptance_counts(
    models: dict[str, torch.nn.Module], case: dict
) -> None:
    p = case["params"]
    s = settings(
        gen_length=p["max_new_tokens"],
        apd_mixture_weight=p["apd_mixture_weight"],
        apd_kv_window=p["kv_window"],
        apd_max_lookahead=p["max_lookahead"],
    )
    ctx = Context(
        prompt=torch.tensor(case["prompt_ids"]),
        settings=s,
        mask_id=MASK,
        generator=torch.Generator(),
    )
    # The reference stops once an end-of-text is anywhere in the canvas.
    assert rounds(ctx, models) == case["acceptance_counts"]
    assert ctx.canvas.tolist() == case["output_ids"]


def test_max_parallel_caps_each_round(models: dict[str, torch.nn.Module]) -> None:
    case = CASES[0]
    assert max(case["acceptance_counts"]) > 2
    ctx = Context(
        prompt=torch.tensor(case["prompt_ids"]),
        settings=settings(max_parallel=2),
        mask_id=MASK,
        generator=torch.Generator(),
    )
    counts = rounds(ctx, models, until_eos=False)
    assert max(counts) == 2 and sum(counts) == 32


@pytest.mark.parametrize(
    "field,kw",
    [
        ("decoding", {"models": frozenset({"main"})}),
        ("apd_mixture_weight", {"apd_mixture_weight": 1.5}),
        ("apd_kv_window", {"apd_kv_window": 0}),
        ("cache", {"cache": "dual"}),
    ],
)
def test_refusals_name_the_field(field: str, kw: dict[str, object]) -> None:
    with pytest.raises(ParamError) as err:
        strategy_for("dream", "apd").check(settings(**kw))
    assert err.value.param == field


def flags(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", str(GOLDEN / "dream-tiny"), "--enable-apd"], "needs --apd-verifier"),
        (["--apd-verifier", "x"], "only with --enable-apd"),
        (["--enable-apd", "--disable-apd", "--apd-verifier", "x"], "only with --enable-apd"),
        (["--decoding", "apd"], "--decoding apd needs --enable-apd"),
        (["--apd-threshold", "1.5"], "--apd-threshold"),
        (["--apd-max-parallel", "0"], "--apd-max-parallel"),
    ],
)
def test_flags_that_cannot_work_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_decoding_flags(flags(*argv))


@pytest.fixture(scope="module")
def llada() -> LoadedModel:
    return load_model(str(GOLDEN / "llada-tiny"))


def test_the_built_in_model_brings_its_verifier() -> None:
    args = flags("--enable-apd")
    check_decoding_flags(args)
    assert Path(args.apd_verifier) == VERIFIER_DIR
    # Given explicitly, the verifier is the one asked for.
    args = flags("--enable-apd", "--apd-verifier", str(GOLDEN / "ar-tiny"))
    check_decoding_flags(args)
    assert args.apd_verifier == str(GOLDEN / "ar-tiny")


def test_verifier_needs_a_diffusion_model_and_a_shared_tokenizer(llada: LoadedModel) -> None:
    args = flags("--enable-apd", "--apd-verifier", str(GOLDEN / "ar-tiny"))
    with pytest.raises(ValueError, match="LLaDA or Dream"):
        load_verifier(args, load_model(str(GOLDEN / "ar-tiny")))
    assert load_verifier(args, llada) is not None
    dream = load_model(str(GOLDEN / "dream-tiny"))
    assert load_verifier(args, dream) is not None
    other = flags("--enable-apd", "--apd-verifier", str(VERIFIER_DIR))
    with pytest.raises(ValueError, match="tokenizes differently"):
        load_verifier(other, dream)
    wrong = flags("--enable-apd", "--apd-verifier", str(GOLDEN / "llada-tiny"))
    with pytest.raises(ValueError, match="autoregressive"):
        load_verifier(wrong, dream)


def test_llada_drafts_are_not_shifted() -> None:
    """LLaDA predicts a position at that position (Dream at the one before). With R = 1 the
    mixture is the draft itself, so one round commits the model's choices at the canvas's own
    positions."""
    tiny, verifier = load_model(str(MODEL_DIR)), load_model(str(VERIFIER_DIR))
    assert tiny.mask_token_id is not None
    models = {"main": tiny.model, "verifier": verifier.model}
    prompt = torch.tensor(
        tiny.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Reverse the words: moon river"}]
        )
    )
    P, N = prompt.numel(), 8
    ctx = Context(
        prompt=prompt,
        settings=settings(gen_length=N, steps=N, block_length=N, apd_mixture_weight=1.0),
        mask_id=tiny.mask_token_id,
        generator=torch.Generator(),
    )
    with torch.no_grad():
        logits = tiny.model(torch.cat([prompt, ctx.canvas]).unsqueeze(0)).logits[0]
        per_pass: list[int] = []
        drive(strategy_for("llada", "apd")(ctx), models, per_pass)
    assert per_pass == [0, N]  # the draft pass commits nothing, the verifier's round all
    assert ctx.canvas.tolist() == logits[P : P + N].argmax(-1).tolist()
    assert ctx.canvas.tolist() != logits[P - 1 : P + N - 1].argmax(-1).tolist()

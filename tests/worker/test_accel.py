"""Acceleration options in process: flags, refusals, attention backends, quantization,
the compile fallback and the engine's shape buckets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from loguru import logger
from safetensors.torch import load_file

from tests.worker.drive import runner
from vdiff_worker import accel
from vdiff_worker.accel import AccelError, Options, use_compiled_block
from vdiff_worker.decoding.base import Forward, full_sequence
from vdiff_worker.models import LoadedModel, extension, load_model
from vdiff_worker.models.kvcache import SlotBatch, SlotStore
from vdiff_worker.models.layers import (
    attend,
    attention_backend,
    flash_attention,
    set_attention_backend,
)
from vdiff_worker.runner import Call

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def sdpa_after() -> Iterator[None]:
    yield
    set_attention_backend("sdpa")


@pytest.fixture(scope="module")
def llada_cases() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / "cases" / "llada_logits.safetensors"))


def _flags(**over: Any) -> Options:
    flags: dict[str, Any] = {
        "compile": False,
        "compile_mode": "default",
        "attention": "sdpa",
        "flash_attention": None,
        "quantization": None,
        **over,
    }
    return Options.from_flags(**flags)


# ---- flags -------------------------------------------------------------------------------
def test_flags_and_the_seeds_aliases() -> None:
    assert _flags() == Options()
    assert _flags(quantization="8bit").quantization == "int8"
    assert _flags(quantization="4bit").quantization == "int4"
    assert _flags(quantization="none").quantization is None
    assert _flags(flash_attention=True).attention == "flash"
    assert _flags(attention="flash", flash_attention=True).attention == "flash"
    assert _flags(flash_attention=False).attention == "sdpa"
    assert _flags(attention="eager", flash_attention=False).attention == "eager"
    assert _flags(attention="eager").attention == "eager"
    with pytest.raises(AccelError, match="--flash-attention contradicts --attention eager"):
        _flags(attention="eager", flash_attention=True)
    with pytest.raises(AccelError, match="--no-flash-attention contradicts --attention flash"):
        _flags(attention="flash", flash_attention=False)
    with pytest.raises(AccelError, match="--compile-mode"):
        _flags(compile_mode="fastest")
    with pytest.raises(AccelError, match="--quantization"):
        _flags(quantization="int3")


def test_int4_loads_in_bfloat16_unless_told_otherwise() -> None:
    int4 = Options(quantization="int4")
    assert accel.load_dtype("auto", int4) == "bfloat16"
    assert accel.load_dtype("float32", int4) == "float32"  # and check() refuses it
    assert accel.load_dtype("auto", Options(quantization="int8")) == "auto"


def test_refusals_name_the_problem() -> None:
    with pytest.raises(
        AccelError, match="--attention flash needs a CUDA GPU; this worker runs on cpu"
    ):
        accel.check(Options(attention="flash"), CPU)
    with pytest.raises(AccelError, match="int4 needs bfloat16 activations.*model is float32"):
        accel.check(Options(quantization="int4"), CPU, torch.float32)
    with pytest.raises(AccelError, match="runs on CPU and CUDA only, not on meta"):
        accel.check(Options(quantization="int8"), torch.device("meta"))
    accel.check(Options(quantization="int8"), CPU, torch.float32)
    accel.check(Options(quantization="int4"), CPU, torch.bfloat16)
    accel.check(Options(attention="eager", compile=True), CPU, torch.float32)


def test_shape_buckets_only_with_cuda_graphs() -> None:
    cuda = torch.device("cuda")
    assert accel.bucket_shapes(Options(compile=True, compile_mode="reduce-overhead"), cuda)
    assert accel.bucket_shapes(Options(compile=True, compile_mode="max-autotune"), cuda)
    assert not accel.bucket_shapes(Options(compile=True), cuda)
    assert not accel.bucket_shapes(Options(compile=True, compile_mode="reduce-overhead"), CPU)
    assert not accel.bucket_shapes(Options(compile_mode="reduce-overhead"), cuda)


# ---- attention backends ----------------------------------------------------------------
@pytest.mark.parametrize("model", ["llada-tiny", "dream-tiny"])
def test_eager_attention_equals_sdpa_within_1e4(model: str) -> None:
    loaded = load_model(str(GOLDEN / model))
    ids = torch.randint(0, 400, (3, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[1, :7] = False  # a left-padded row
    mask[2, 30:] = False  # a right-padded row
    pos = torch.arange(40).repeat(3, 1)
    outs = {}
    for backend in ("sdpa", "eager"):
        accel.apply(loaded.model, Options(attention=backend), CPU)
        assert attention_backend() == backend
        with torch.no_grad():
            outs[backend] = loaded.model(ids, position_ids=pos, key_mask=mask).logits
    assert (outs["eager"] - outs["sdpa"]).abs().max().item() <= 1e-4


def _slots(g: torch.Generator) -> SlotBatch:
    store = SlotStore(
        layers=1,
        slots=3,
        kv_heads=2,
        length=16,
        head_dim=8,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    store.keys[0].copy_(torch.randn(store.keys[0].shape, generator=g))
    store.values[0].copy_(torch.randn(store.values[0].shape, generator=g))
    # Rows in slots 2 and 0: five new tokens at 3 (of 12 keys), four at 0 (of 10).
    return SlotBatch(
        store,
        [2, 0],
        [3, 0],
        [5, 4],
        [12, 10],
    )


def test_eager_attention_with_caches_and_groups() -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 5, 8, generator=g)
    kv = (torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g))
    cache = _slots(g)
    assert cache.key_mask is not None
    mask = cache.key_mask[:, None, None, :]
    want = attend(q, kv, mask, cache, 0)
    set_attention_backend("eager")
    assert (attend(q, kv, mask, cache, 0) - want).abs().max().item() <= 1e-5


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """flash_attn_func's contract ([B, L, H, D], grouped keys) written with SDPA."""
    assert not causal
    groups = q.shape[2] // k.shape[2]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2).repeat_interleave(groups, dim=1),
        v.transpose(1, 2).repeat_interleave(groups, dim=1),
    )
    return out.transpose(1, 2)


def _varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    causal: bool,
) -> torch.Tensor:
    """flash_attn_varlen_func's contract (packed [total, H, D] and offsets), one row at a time."""
    assert int((cu_q[1:] - cu_q[:-1]).max()) <= max_q
    assert int((cu_k[1:] - cu_k[:-1]).max()) <= max_k
    rows = []
    for i in range(len(cu_q) - 1):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        rows.append(_dense(q[None, qs], k[None, ks], v[None, ks], causal)[0])
    return torch.cat(rows)


def test_flash_packing_matches_sdpa_with_reference_kernels() -> None:
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 4, 6, 8, generator=g)
    k, v = torch.randn(3, 2, 9, 8, generator=g), torch.randn(3, 2, 9, 8, generator=g)
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., :3] = False  # left padding
    mask[1, ..., 6:] = False  # right padding
    mask[2, ..., 2:4] = False  # a hole: packing keeps whatever pattern the mask has
    full_k, full_v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    want = F.scaled_dot_product_attention(q, full_k, full_v, attn_mask=mask)
    got = flash_attention(q, k, v, mask, _dense, _varlen)
    assert (got - want).abs().max().item() <= 1e-5
    unmasked = flash_attention(q, k, v, None, _dense, _varlen)
    assert (unmasked - F.scaled_dot_product_attention(q, full_k, full_v)).abs().max() <= 1e-5


def test_attention_reaches_transformers_models() -> None:
    ar = load_model(str(GOLDEN / "ar-tiny"))
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        sdpa = ar.model(ids).logits
        accel.apply(ar.model, Options(attention="eager"), CPU)
        assert ar.model.hf.config._attn_implementation == "eager"
        eager = ar.model(ids).logits
    assert (eager - sdpa).abs().max().item() <= 1e-4


# ---- quantization ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("scheme", "dtype", "max_ratio", "min_agree"),
    [("int8", "auto", 0.35, 0.97), ("int4", "bfloat16", 0.2, 0.8)],
)
def test_weight_only_quantization(
    llada_cases: dict[str, torch.Tensor],
    scheme: str,
    dtype: str,
    max_ratio: float,
    min_agree: float,
) -> None:
    """Weights shrink, and the next-token argmax mostly agrees with the float32 reference."""
    full = load_model(str(GOLDEN / "llada-tiny"))
    opts = Options(quantization=scheme)
    loaded = load_model(str(GOLDEN / "llada-tiny"), dtype=accel.load_dtype(dtype, opts))
    assert accel.quantize(loaded.model, scheme, CPU) >= 16  # of 17: int4 keeps the vocab head
    assert accel.weight_bytes(loaded.model) <= max_ratio * accel.weight_bytes(full.model)
    agree = []
    with torch.no_grad():
        for k in range(3):
            logits = loaded.model(llada_cases[f"input_ids_{k}"][None]).logits[0].float()
            ref = llada_cases[f"logits_{k}"]
            assert not torch.equal(logits, ref)  # the quantized weights are the ones read
            agree.append((logits.argmax(-1) == ref.argmax(-1)).float().mean().item())
    assert min(agree) >= min_agree


# ---- compile ---------------------------------------------------------------------------
def test_compile_failure_falls_back_to_eager(llada_cases: dict[str, torch.Tensor]) -> None:
    def broken_backend(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Any:
        raise RuntimeError("no C++ compiler here")

    loaded = load_model(str(GOLDEN / "llada-tiny"))
    compiled = accel.CompiledRegions(
        loaded.model.layers(), lambda f: torch.compile(f, backend=broken_backend)
    )
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")
    try:
        with torch.no_grad():
            out = loaded.model(llada_cases["input_ids_0"][None])
            again = loaded.model(llada_cases["input_ids_1"][None])
    finally:
        logger.remove(sink)
    assert compiled.failed
    assert (out.logits[0] - llada_cases["logits_0"]).abs().max().item() <= 1e-4
    assert (again.logits[0] - llada_cases["logits_1"]).abs().max().item() <= 1e-4
    assert len(lines) == 1 and "no C++ compiler here" in lines[0]


def test_compile_refuses_models_without_vdiffs_forward() -> None:
    with pytest.raises(AccelError, match="--compile applies to LLaDA, Dream"):
        accel.compile_model(torch.nn.Linear(2, 2), "default")


# ---- engine shape buckets --------------------------------------------------------------
class _Recorder(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, input_ids: torch.Tensor, **kw: Any) -> Any:
        self.shapes.append(tuple(input_ids.shape))
        return self.inner(input_ids, **kw)


@pytest.fixture(scope="module")
def llada() -> LoadedModel:
    return load_model(str(GOLDEN / "llada-tiny"))


def test_shape_buckets_pad_rows_and_length_without_changing_logits(llada: LoadedModel) -> None:
    g = torch.Generator().manual_seed(3)
    calls: list[Forward] = [
        full_sequence(torch.randint(0, 400, (n,), generator=g), torch.full((m,), 482))
        for n, m in ((20, 16), (27, 16), (9, 32))
    ]
    plain = runner({"main": llada.model})
    with torch.no_grad():
        want = plain._batched([Call(f) for f in calls])
    recorder = _Recorder(llada.model)
    bucketed = runner({"main": recorder})
    bucketed.shape_buckets = True
    with torch.no_grad():
        got = bucketed._batched([Call(f) for f in calls])
        alone = bucketed._batched([Call(calls[0])])  # a single pass is bucketed too
    assert recorder.shapes == [(4, 64), (1, 64)]  # 3 rows -> 4; 43 tokens -> 64
    for a, b in zip(got + alone, want + want[:1]):
        assert a.logits.shape == b.logits.shape
        assert (a.logits - b.logits).abs().max().item() <= 1e-4


def test_the_compiled_block_is_off_for_compiled_or_quantized_models() -> None:
    """Dynamo cannot trace into it, and torchao's weights dispatch through Python."""
    try:
        assert use_compiled_block(Options()) and extension.ops() is not None
        for opts in (Options(compile=True), Options(quantization="int8")):
            assert not use_compiled_block(opts)
            assert extension.ops() is None
    finally:
        extension.disable()

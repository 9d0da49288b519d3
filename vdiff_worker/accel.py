"""Worker acceleration: torch.compile, the attention backend, weight-only quantization.

``Options.from_flags`` reads the worker's flags, ``check`` refuses what this machine cannot
run (before the model is loaded, and again once its dtype is known) and ``apply`` turns the
options on for a loaded model. Measured on CPU by ``bench/acceleration.py``; the README's
"Acceleration" section has the figures.

Quantization goes through torchao (a maintained library, so vdiff carries no kernels of its
own): int8 is ``Int8WeightOnlyConfig`` on CPU and CUDA; int4 is ``Int4WeightOnlyConfig``'s
tinygemm layout on CUDA and the CPU tinygemm kernel (``PrototypeInt4WeightOnlyConfig``) on
CPU. Both int4 kernels take bfloat16 activations, so int4 loads the model in bfloat16.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from loguru import logger
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from vdiff_worker.models import extension
from vdiff_worker.models.ar import CausalLM
from vdiff_worker.models.base import BidirectionalLM
from vdiff_worker.models.layers import ATTENTION_BACKENDS, AttentionBackend, set_attention_backend

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
QUANTIZATIONS = ("int8", "int4")
_QUANT_NAMES = {"int8": "int8", "8bit": "int8", "int4": "int4", "4bit": "int4"}
INT4_GROUP_SIZE = 128
_HF_ATTENTION = {"sdpa": "sdpa", "eager": "eager", "flash": "flash_attention_2"}
_WARMUP_LENGTH = 64  # tokens in the warm-up passes that compile the model at start


class AccelError(ValueError):
    """An acceleration option this worker cannot use; the message says why and what to do."""


@dataclass(frozen=True)
class Options:
    compile: bool = False
    compile_mode: str = "default"
    attention: AttentionBackend = "sdpa"
    quantization: str | None = None  # "int8" | "int4" | None

    @classmethod
    def from_flags(
        cls,
        *,
        compile: bool,
        compile_mode: str,
        attention: str,
        flash_attention: bool | None,
        quantization: str | None,
    ) -> Options:
        """Normalise the flags: the seed's aliases, conflicting spellings refused."""
        if compile_mode not in COMPILE_MODES:
            raise AccelError(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}")
        if attention not in ATTENTION_BACKENDS:
            raise AccelError(f"--attention must be one of {', '.join(ATTENTION_BACKENDS)}")
        backend: AttentionBackend = attention  # type: ignore[assignment]
        if flash_attention and attention not in ("sdpa", "flash"):
            raise AccelError(f"--flash-attention contradicts --attention {attention}")
        if flash_attention is False and attention == "flash":
            raise AccelError("--no-flash-attention contradicts --attention flash")
        if flash_attention:
            backend = "flash"
        quant = None
        if quantization not in (None, "none"):
            if quantization not in _QUANT_NAMES:
                raise AccelError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}")
            quant = _QUANT_NAMES[quantization]
        return cls(
            compile=compile, compile_mode=compile_mode, attention=backend, quantization=quant
        )


def load_dtype(requested: str, opts: Options) -> str:
    """The --dtype to load with: ``auto`` becomes bfloat16 for int4, whose kernels need it."""
    return "bfloat16" if requested == "auto" and opts.quantization == "int4" else requested


def check(opts: Options, device: torch.device, dtype: torch.dtype | None = None) -> None:
    """Refuse options this device cannot run (``dtype`` None: the dtype checks wait)."""
    if opts.attention == "flash":
        _check_flash(device, dtype)
    if opts.quantization is not None:
        _check_quantization(opts.quantization, device, dtype)


def _check_flash(device: torch.device, dtype: torch.dtype | None) -> None:
    if device.type != "cuda":
        raise AccelError(
            f"--attention flash needs a CUDA GPU; this worker runs on "
            f"{device.type} (use --attention sdpa)"
        )
    if importlib.util.find_spec("flash_attn") is None:
        raise AccelError(
            "--attention flash needs the flash-attn package "
            "(pip install flash-attn --no-build-isolation), or use --attention sdpa"
        )
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise AccelError(
            f"--attention flash needs an Ampere or newer GPU (compute capability "
            f"8.0+); {device} is {major}.{minor} (use --attention sdpa)"
        )
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        raise AccelError(
            f"--attention flash runs in half precision; the model is {_name(dtype)} "
            "(use --dtype bfloat16 or float16)"
        )


def _check_quantization(scheme: str, device: torch.device, dtype: torch.dtype | None) -> None:
    flag = f"--quantization {scheme}"
    if device.type not in ("cpu", "cuda"):
        raise AccelError(f"{flag} runs on CPU and CUDA only, not on {device.type}")
    if importlib.util.find_spec("torchao") is None:
        raise AccelError(f"{flag} needs torchao (pip install 'vdiff[worker]')")
    if scheme == "int4":
        if dtype is not None and dtype != torch.bfloat16:
            raise AccelError(
                f"{flag} needs bfloat16 activations (torchao's int4 kernels); the "
                f"model is {_name(dtype)}: use --dtype bfloat16 or auto"
            )
        if device.type == "cpu" and _int4_cpu_config() is None:
            raise AccelError(
                f"{flag} on CPU needs torchao's PrototypeInt4WeightOnlyConfig, "
                "which this torchao lacks; use --quantization int8"
            )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torchao() -> Any:
    """Import torchao, keeping its notes about optional CUDA extensions out of the log."""
    log = logging.getLogger("torchao")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torchao.quantization

        return torchao.quantization
    finally:
        log.setLevel(level)


def _int4_cpu_config() -> Any:
    _torchao()
    try:
        from torchao.prototype.quantization.int4.inference_workflow import (
            PrototypeInt4WeightOnlyConfig,
        )
    except ImportError:
        return None
    return PrototypeInt4WeightOnlyConfig


def apply(model: nn.Module, opts: Options, device: torch.device) -> nn.Module:
    """Turn the options on for a loaded model (in place; returned for convenience)."""
    _apply_attention(model, opts.attention)
    if opts.quantization is not None:
        quantize(model, opts.quantization, device)
    if opts.compile:
        compile_model(model, opts.compile_mode)
    return model


def use_compiled_block(opts: Options) -> bool:
    """Run the native models' blocks through the compiled block (vdiff_worker.models
    .extension) unless the model is compiled or quantized (``compile_model`` and
    ``quantize`` turn it off); whether it is on."""
    if opts.compile or opts.quantization is not None:
        extension.disable()
        return False
    return extension.enable()


def _apply_attention(model: nn.Module, backend: AttentionBackend) -> None:
    if isinstance(model, BidirectionalLM):
        set_attention_backend(backend)
        return
    from transformers import PreTrainedModel

    hf = model.hf if isinstance(model, CausalLM) else model
    if isinstance(hf, PreTrainedModel):
        hf.set_attn_implementation(_HF_ATTENTION[backend])
        return
    if backend != "sdpa":
        raise AccelError(
            f"--attention {backend} applies to LLaDA, Dream and transformers "
            f"models, not to {type(model).__name__}"
        )


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the parameters and buffers, quantized tensors' inner data included."""
    return sum(_tensor_bytes(t) for t in (*model.parameters(), *model.buffers()))


def _tensor_bytes(t: torch.Tensor) -> int:
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def quantize(model: nn.Module, scheme: str, device: torch.device) -> int:
    """Weight-only quantization of the linear layers torchao's kernels accept; returns how
    many were quantized (the others, e.g. a vocabulary projection of odd width, stay)."""
    extension.disable()  # torchao's weights dispatch through Python, not from C++
    tq = _torchao()
    if scheme == "int8":
        config: Any = tq.Int8WeightOnlyConfig()
        fits: Callable[[nn.Linear], bool] = lambda layer: True
    elif device.type == "cuda":
        from torchao.quantization.quantize_.workflows import Int4PackingFormat

        config = tq.Int4WeightOnlyConfig(
            group_size=INT4_GROUP_SIZE, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D
        )
        fits = lambda layer: layer.in_features % INT4_GROUP_SIZE == 0
    else:
        config = _int4_cpu_config()(group_size=INT4_GROUP_SIZE)
        # The CPU tinygemm packing needs whole groups and 16-row tiles.
        fits = lambda layer: (
            layer.in_features % INT4_GROUP_SIZE == 0 and layer.out_features % 16 == 0
        )
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = {name for name, m in linears.items() if fits(m)}
    kept = sorted(set(linears) - chosen)
    before = weight_bytes(model)
    tq.quantize_(model, config, filter_fn=lambda m, fqn: fqn in chosen)
    after = weight_bytes(model)
    logger.info(
        "{} weight-only quantization: {} of {} linear layers{}; weights {:.1f} MiB -> {:.1f} MiB",
        scheme,
        len(chosen),
        len(linears),
        f" (kept {', '.join(kept)}: shape not supported)" if kept else "",
        before / 2**20,
        after / 2**20,
    )
    return len(chosen)


class CompiledRegions:
    """torch.compile over a model's regions, every region back to eager on any failure.

    For LLaDA and Dream the regions are the transformer blocks: they share one code object,
    so one compilation serves every layer (compile time does not grow with depth) and the
    embedding, the head and the cache bookkeeping stay eager. Shapes are dynamic, so a new
    batch size or length does not recompile; a compilation that does happen (the first call
    with a new cache layout, say) is logged with its time.
    """

    def __init__(
        self,
        regions: Sequence[nn.Module],
        compile_fn: Callable[[Callable[..., Any]], Callable[..., Any]],
    ) -> None:
        self.failed = False
        self.regions = list(regions)
        self.eager = [m.forward for m in self.regions]
        for module, eager in zip(self.regions, self.eager):
            # nn.Module.__call__ looks forward up on the instance: this reroutes every call.
            module.forward = self._region(eager, compile_fn(eager))  # type: ignore[method-assign]

    def _region(
        self, eager: Callable[..., Any], compiled: Callable[..., Any]
    ) -> Callable[..., Any]:
        from torch._dynamo.exc import TorchDynamoException
        from torch._dynamo.utils import counters

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.failed:
                return eager(*args, **kwargs)
            graphs = counters["stats"]["unique_graphs"]
            start = time.perf_counter()
            try:
                out = compiled(*args, **kwargs)
            except TorchDynamoException as err:
                self.fall_back(err)
                return eager(*args, **kwargs)
            new = counters["stats"]["unique_graphs"] - graphs
            if new:
                shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else ""
                logger.info(
                    "torch.compile: {} new graph(s) for input {} in {:.1f} s",
                    new,
                    shape,
                    time.perf_counter() - start,
                )
            return out

        return forward

    def fall_back(self, err: Exception) -> None:
        self.failed = True
        for module, eager in zip(self.regions, self.eager):
            module.forward = eager  # type: ignore[method-assign]
        why = " ".join(str(err).split("\n\n")[0].split())
        logger.warning("torch.compile failed, running eager from now on: {}", why)


def compile_model(model: nn.Module, mode: str) -> CompiledRegions:
    """Compile ``model`` in place (its blocks, or the whole forward of an autoregressive
    model) and warm it up, so the first requests do not pay for compiling the engine's plain
    passes; a failure leaves the model eager, with a warning."""
    extension.disable()  # Dynamo would break its graph at every call into it
    if isinstance(model, BidirectionalLM):
        regions: Sequence[nn.Module] = model.layers()
    elif isinstance(model, CausalLM):
        regions = [model]
    else:
        raise AccelError(
            f"--compile applies to LLaDA, Dream and autoregressive models, not to "
            f"{type(model).__name__}"
        )
    compiled = CompiledRegions(regions, lambda f: torch.compile(f, mode=mode, dynamic=True))
    device = next(model.parameters()).device
    n = _WARMUP_LENGTH
    ids = [torch.zeros(rows, n, dtype=torch.long, device=device) for rows in (1, 2, 2)]
    # Fresh tensors laid out like the engine's (dynamo guards on strides and view bases):
    # one sequence, the two expanded rows of classifier-free guidance, a padded batch.
    positions = [
        torch.arange(n, device=device).repeat(1, 1),
        torch.arange(n, device=device).expand(2, n),
        torch.arange(n, device=device).repeat(2, 1),
    ]
    masks = [None, None, torch.ones(2, n, dtype=torch.bool, device=device)]
    start = time.perf_counter()
    with torch.no_grad():
        for i, pos, mask in zip(ids, positions, masks):
            model(i, position_ids=pos, key_mask=mask)
    seconds = time.perf_counter() - start
    if compiled.failed:
        logger.warning("torch.compile (mode {}) unavailable; serving eager", mode)
    else:
        logger.info("torch.compile (mode {}): warm-up compiled in {:.1f} s", mode, seconds)
    return compiled


def bucket_shapes(opts: Options, device: torch.device) -> bool:
    """Whether the engine should pad batches to bucketed shapes: with CUDA graphs (the
    reduce-overhead and max-autotune modes on a GPU), each distinct shape is one recording."""
    return opts.compile and opts.compile_mode != "default" and device.type == "cuda"

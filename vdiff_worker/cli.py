"""`vdiff-worker`: load a model and serve it to one or more gateways."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from loguru import logger

from vdiff_common import config, curve
from vdiff_common.logging import setup_logging
from vdiff_common.protocol import DECODINGS, ModelInfo
from vdiff_worker.tiny import MODEL_DIR, VERIFIER_DIR

if TYPE_CHECKING:  # the gateway imports this module for its flags, without torch
    from torch import nn

    from vdiff_worker.admission import Defaults
    from vdiff_worker.models.loader import LoadedModel

DEFAULT_MODEL = str(MODEL_DIR)


def add_worker_args(p: argparse.ArgumentParser, standalone: bool) -> None:
    g = p.add_argument_group("worker")
    config.add(
        g,
        "--model",
        default=DEFAULT_MODEL,
        help="checkpoint to serve: a directory, or a Hugging Face id (e.g. "
        "GSAI-ML/LLaDA-8B-Instruct) found in the cache or downloaded into it",
    )
    config.add(
        g,
        "--revision",
        default=None,
        help="branch, tag or commit of a Hugging Face id given to --model (default: main)",
    )
    config.add(
        g,
        "--download-dir",
        default=None,
        help="Hugging Face cache for the ids of --model, --tokenizer and --apd-verifier "
        "(default: huggingface_hub's, HF_HUB_CACHE or HF_HOME/hub); HF_HUB_OFFLINE=1 "
        "reads it only, HF_TOKEN opens gated repos",
    )
    config.add(
        g,
        "--served-model-name",
        default=None,
        help="name clients use (default: --model as given for a Hugging Face id, the "
        "directory's name for a directory)",
    )
    config.add(
        g,
        "--tokenizer",
        default=None,
        help="tokenizer directory or Hugging Face id (default: --model's)",
    )
    config.add(
        g,
        "--tokenizer-revision",
        default=None,
        help="branch, tag or commit of a Hugging Face id given to --tokenizer (default: main)",
    )
    config.add(g, "--chat-template", default=None, help="Jinja chat template file")
    config.add(
        g,
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="weight dtype",
    )
    config.add(g, "--device", default="auto", help="torch device: auto, cpu, cuda, cuda:N")
    config.add(
        g,
        "--trust-remote-code",
        default=False,
        type=bool,
        help="allow remote code for the transformers fallback (LLaDA, Dream and "
        "DiffusionGemma are built in and ignore it)",
    )
    config.add(
        g,
        "--diffusion-steps",
        default=None,
        type=int,
        help="default denoising steps (default: one per generated token)",
    )
    config.add(g, "--block-size", default=None, type=int, help="default semi-AR block length (32)")
    config.add(
        g,
        "--max-tokens",
        default=None,
        type=int,
        help="default generation canvas when a request sets no max_tokens (128)",
    )
    config.add(
        g,
        "--decoding",
        default=None,
        choices=list(DECODINGS),
        help="default strategy (default: fast: threshold with the dual cache for LLaDA "
        "and Dream, reference for the others; with --disable-apd: reference)",
    )
    config.add(
        g,
        "--apd-threshold",
        default=None,
        type=float,
        help="default confidence threshold of decoding 'threshold' (Fast-dLLM) and of "
        "LLaDA2's decodings (default: 0.9; 0.95 for LLaDA2)",
    )
    config.add(
        g,
        "--override-generation-config",
        default=None,
        help="server defaults of any request fields, as JSON (as vLLM's flag): e.g. "
        '\'{"cache": "prefix", "temperature": 0.7}\'; the flags above win for their fields',
    )
    config.add(
        g,
        "--apd-max-parallel",
        default=None,
        type=int,
        help="most tokens one forward pass may commit with decoding threshold, factor "
        "or apd (default: no cap)",
    )
    config.add(
        g,
        "--enable-apd",
        default=False,
        type=bool,
        help="offer decoding 'apd' (the model drafts, --apd-verifier checks); make it "
        "the default with --decoding apd",
    )
    # The seed's spelling of --no-enable-apd. Not a second boolean: the all-in-one launcher
    # re-emits each option from its value, so this one stays None unless given.
    g.add_argument(
        "--disable-apd",
        action="store_const",
        const=True,
        default=None,
        help="same as --no-enable-apd [env VDIFF_ENABLE_APD=0]",
    )
    config.add(
        g,
        "--apd-verifier",
        default=None,
        help="autoregressive checkpoint (directory or Hugging Face id) sharing the "
        "model's tokenizer, APD's verifier (default for the built-in vdiff-tiny: "
        "vdiff-tiny-ar)",
    )
    config.add(
        g,
        "--max-model-len",
        default=None,
        type=int,
        help="context length served (prompt + max_tokens), at most the model's; it also sizes "
        "each sequence's KV cache slot (default: the model's own)",
    )
    config.add(
        g,
        "--max-num-seqs",
        default=16,
        type=int,
        aliases=("--max-concurrent-requests",),
        help="sequences decoded together per step",
    )
    config.add(
        g,
        "--max-queue-size",
        default=256,
        type=int,
        help="sequences waiting for a slot; beyond it requests get 429",
    )
    config.add(
        g,
        "--request-timeout",
        default=None,
        type=float,
        help="seconds before a request is ended with an error",
    )
    config.add(
        g,
        "--metrics-port",
        default=None,
        type=int,
        help="serve this worker's Prometheus /metrics on this port (off when unset)",
    )
    config.add(g, "--metrics-host", default="0.0.0.0", help="address for --metrics-port")
    config.add(
        g,
        "--num-threads",
        default=None,
        type=int,
        help="torch intra-op threads (default: cores / 2, at least 1)",
    )
    config.add(
        g,
        "--compile",
        default=False,
        type=bool,
        help="torch.compile the model's forward (compiled at start; a failure falls "
        "back to eager). Off by default: it does not pay on CPU for small models",
    )
    config.add(
        g,
        "--compile-mode",
        default="default",
        choices=["default", "reduce-overhead", "max-autotune"],
        help="torch.compile mode (reduce-overhead and max-autotune use CUDA graphs on GPUs)",
    )
    config.add(
        g,
        "--attention",
        default="sdpa",
        choices=["sdpa", "flash", "eager"],
        help="attention kernels: PyTorch SDPA, FlashAttention (CUDA, half precision, the "
        "flash-attn package) or eager softmax(QK^T)V",
    )
    # The seed's spelling, kept as an alias; None unless given, like --disable-apd.
    g.add_argument(
        "--flash-attention",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="same as --attention flash (--no-flash-attention: anything but flash)",
    )
    config.add(
        g,
        "--quantization",
        default=None,
        choices=["none", "int8", "int4", "8bit", "4bit"],
        help="weight-only quantization of the linear layers through torchao (8bit, 4bit: "
        "the seed's names); int4 loads the model in bfloat16",
    )
    if standalone:
        config.add(
            g,
            "--gateway",
            default=["tcp://127.0.0.1:5557"],
            repeat=True,
            help="gateway ZeroMQ address (repeatable; DNS names follow all addresses)",
        )
        config.add(g, "--worker-id", default=None, help="stable worker identity")
        config.add(
            g, "--heartbeat-interval", default=1.0, type=float, help="seconds between heartbeats"
        )
        config.add(
            g,
            "--drain-timeout",
            default=30.0,
            type=float,
            help="seconds in-flight work gets to finish on SIGTERM",
        )
        config.add(g, "--log-level", default="info", help="log level")
        config.add(g, "--log-format", default="text", choices=["text", "json"], help="log format")
        config.add(
            g,
            "--zmq-curve-dir",
            default=None,
            help="CURVE key directory: this worker's worker.key_secret and the "
            "gateway's gateway.key (`vdiff keys generate DIR`)",
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vdiff-worker", description=__doc__)
    add_worker_args(p, standalone=True)
    return p


def _device(name: str) -> str:
    import torch

    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


# Flags that set one request field's server default each (the seed's and vLLM's names):
# argparse dest -> SamplingParams field. Every field's default can be set in
# --override-generation-config; these win for theirs.
DEFAULT_FLAGS = {
    "max_tokens": "max_tokens",
    "block_size": "block_length",
    "diffusion_steps": "diffusion_steps",
    "decoding": "decoding",
    "apd_threshold": "threshold",
}


def server_defaults(args: argparse.Namespace) -> Defaults:
    """The server's defaults of request fields: --override-generation-config, under the flags
    of DEFAULT_FLAGS, each checked against its field's type and bounds (ValueError naming it)."""
    from vdiff_worker.admission import Defaults

    fields: dict[str, Any] = {}
    if args.override_generation_config is not None:
        try:
            fields = msgspec.json.decode(args.override_generation_config, type=dict[str, Any])
            Defaults(**fields)
        except (msgspec.DecodeError, ValueError) as err:
            raise ValueError(f"--override-generation-config: {err}") from None
    for dest, field in DEFAULT_FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            try:
                Defaults(**{field: value})
            except ValueError as err:
                raise ValueError(f"--{dest.replace('_', '-')} {value}: {err}") from None
            fields[field] = value
    if args.disable_apd:
        fields.setdefault("decoding", "reference")
    return Defaults(max_parallel=args.apd_max_parallel, **fields)


def check_decoding_flags(args: argparse.Namespace) -> Defaults:
    """Refuse decoding flags that cannot work, before anything is loaded; the server's
    defaults they give."""
    defaults = server_defaults(args)
    if args.apd_max_parallel is not None and args.apd_max_parallel < 1:
        raise ValueError(f"--apd-max-parallel must be at least 1, not {args.apd_max_parallel}")
    if apd_enabled(args) and args.apd_verifier is None:
        if Path(args.model).resolve() != MODEL_DIR:
            raise ValueError(
                "--enable-apd needs --apd-verifier DIR: an autoregressive "
                "checkpoint that shares the model's tokenizer (only the built-in "
                "vdiff-tiny has a default verifier)"
            )
        args.apd_verifier = str(VERIFIER_DIR)
    if not apd_enabled(args) and args.apd_verifier is not None:
        raise ValueError("--apd-verifier is used only with --enable-apd")
    if defaults.params.decoding == "apd" and not apd_enabled(args):
        raise ValueError("--decoding apd needs --enable-apd --apd-verifier DIR")
    return defaults


def apd_enabled(args: argparse.Namespace) -> bool:
    return bool(args.enable_apd) and not args.disable_apd


def load_verifier(args: argparse.Namespace, loaded: LoadedModel) -> nn.Module | None:
    """APD's verifier, or None when APD is off; refuses one that cannot verify this model."""
    from vdiff_worker.models.loader import load_model

    if not apd_enabled(args):
        return None
    if loaded.kind not in ("dream", "llada"):
        raise ValueError(
            f"APD drafts with a LLaDA or Dream model; {args.model} is a {loaded.kind} checkpoint"
        )
    verifier = load_model(
        args.apd_verifier,
        dtype=args.dtype,
        device=str(loaded.device),
        trust_remote_code=args.trust_remote_code,
        download_dir=args.download_dir,
    )
    if verifier.kind != "ar":
        raise ValueError(
            f"--apd-verifier {args.apd_verifier} is a {verifier.kind} checkpoint; "
            "APD needs an autoregressive (causal LM) one"
        )
    probe = "APD checks a draft token by token: 12 + 30 = 42.\n"
    if verifier.tokenizer.encode(probe) != loaded.tokenizer.encode(probe):
        raise ValueError(
            f"--apd-verifier {args.apd_verifier} tokenizes differently from "
            f"{args.model}; APD needs a shared vocabulary"
        )
    return verifier.model


async def serve(args: argparse.Namespace) -> int:
    import torch

    from vdiff_worker import accel
    from vdiff_worker.decoding import ParamError, strategy_for
    from vdiff_worker.engine import Engine
    from vdiff_worker.metrics import WorkerMetrics
    from vdiff_worker.metrics import serve as serve_metrics
    from vdiff_worker.models.errors import CheckpointError
    from vdiff_worker.models.loader import load_model
    from vdiff_worker.service import WorkerService

    torch.set_num_threads(args.num_threads or max(1, (os.cpu_count() or 2) // 2))
    try:
        defaults = check_decoding_flags(args)
        opts = accel.Options.from_flags(
            compile=args.compile,
            compile_mode=args.compile_mode,
            attention=args.attention,
            flash_attention=args.flash_attention,
            quantization=args.quantization,
        )
        dtype = accel.load_dtype(args.dtype, opts)
        accel.check(
            opts,
            torch.device(_device(args.device)),
            None if dtype == "auto" else getattr(torch, dtype),
        )
        keys = curve.client_keys(args.zmq_curve_dir) if args.zmq_curve_dir else None
    except ValueError as err:
        logger.error("{}", err)
        return 2
    try:
        loaded = load_model(
            args.model,
            dtype=dtype,
            device=_device(args.device),
            tokenizer_path=args.tokenizer,
            chat_template=args.chat_template,
            trust_remote_code=args.trust_remote_code,
            revision=args.revision,
            download_dir=args.download_dir,
            tokenizer_revision=args.tokenizer_revision,
        )
    except CheckpointError as err:
        logger.error("cannot load model: {}", err)
        return 2
    if args.max_model_len is not None:
        if not 0 < args.max_model_len <= loaded.max_model_len:
            logger.error(
                "--max-model-len must be within 1..{} (the model's), not {}",
                loaded.max_model_len,
                args.max_model_len,
            )
            return 2
        loaded.max_model_len = args.max_model_len
    if defaults.params.decoding is not None:
        try:
            strategy_for(loaded.kind, defaults.params.decoding)
        except ParamError as err:
            logger.error("--decoding {}: {}", defaults.params.decoding, err)
            return 2
    try:
        verifier = load_verifier(args, loaded)
    except (CheckpointError, ValueError) as err:
        logger.error("cannot use the APD verifier: {}", err)
        return 2
    try:
        accel.check(opts, loaded.device, loaded.dtype)
        accel.apply(loaded.model, opts, loaded.device)
        if verifier is not None:  # the verifier shares the attention kernels, nothing else
            accel.apply(verifier, accel.Options(attention=opts.attention), loaded.device)
    except accel.AccelError as err:
        logger.error("{}", err)
        return 2
    if accel.use_compiled_block(opts):
        logger.info("the native blocks run compiled (vdiff_worker/models/block.cpp)")
    name = args.served_model_name or loaded.name
    worker_id = args.worker_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    metrics = WorkerMetrics(name, worker_id, loaded.device)
    metrics.memory()
    if args.metrics_port is not None:
        serve_metrics(args.metrics_port, args.metrics_host)
    service: WorkerService
    engine = Engine(
        loaded,
        defaults,
        lambda m: service.emit(m),
        metrics=metrics,
        max_num_seqs=args.max_num_seqs,
        request_timeout=args.request_timeout,
        max_queue_size=args.max_queue_size,
        verifier=verifier,
        shape_buckets=accel.bucket_shapes(opts, loaded.device),
    )
    service = WorkerService(
        engine,
        list(args.gateway),
        worker_id,
        ModelInfo(name=name, max_model_len=loaded.max_model_len, kind=loaded.kind),
        heartbeat_s=args.heartbeat_interval,
        curve=keys,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    engine.start()
    logger.info("worker {} serving {} ({}) from {}", worker_id, name, loaded.kind, args.model)
    await service.run(stop, args.drain_timeout)
    engine.stop()
    return 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    sys.exit(asyncio.run(serve(args)))


if __name__ == "__main__":
    main()

"""Checkpoint loading: pick the implementation from config.json, load weights, tokenizer.

A checkpoint is a local directory or a Hugging Face id (``hub``): an id is resolved in two
steps, its config.json first, so that an architecture vdiff cannot serve is refused before
gigabytes of weights are downloaded, then the files that architecture needs.

LLaDA, LLaDA2 (MoE) and Dream are native: built on the meta device and filled from
memory-mapped safetensors. DiffusionGemma and any other causal LM (the autoregressive fallback) load
through transformers; remote code is allowed for the fallback only, when asked. Every
failure a user can cause is a ``CheckpointError`` naming the file, weight or field.

``dtype="auto"`` uses the checkpoint's ``torch_dtype``, except that half precision
becomes float32 on CPU (CPU half matmuls are slow and the reference outputs are float32)
and that GPUs serve float32 and bfloat16 checkpoints in bfloat16, or float16 where the GPU
has no bfloat16.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from vdiff_common.protocol import ModelKind
from vdiff_worker.models import hub
from vdiff_worker.models.ar import CausalLM
from vdiff_worker.models.config import get_int
from vdiff_worker.models.dream import DreamConfig, DreamModel
from vdiff_worker.models.errors import CheckpointError
from vdiff_worker.models.hf import load_pretrained
from vdiff_worker.models.llada import LLaDAConfig, LLaDAModel
from vdiff_worker.models.llada2 import LLaDA2Config, LLaDA2Model
from vdiff_worker.models.weights import load_weights
from vdiff_worker.tokenizer import Tokenizer, TokenizerError

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}
_MASK_TOKENS = ("<|mdm_mask|>", "<|mask|>")
_FALLBACK_MAX_LEN = 2048


@dataclass
class LoadedModel:
    model: nn.Module  # eval mode, on device, requires_grad False
    kind: ModelKind
    name: str  # default served name: the Hub id as given, or the directory's basename
    path: str  # the directory read: the local one, or the id's snapshot in the cache
    tokenizer: Tokenizer
    mask_token_id: int | None
    max_model_len: int
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class _Request:
    root: Path
    cfg: dict[str, Any]
    dtype: torch.dtype
    device: torch.device
    trust_remote_code: bool


@dataclass(frozen=True)
class _Built:
    model: nn.Module
    mask_token_id: int | None
    max_model_len: int


def _native(model: nn.Module, req: _Request) -> nn.Module:
    load_weights(model, req.root, req.dtype, req.device)
    return model.eval()


def _build_llada(req: _Request) -> _Built:
    config = LLaDAConfig.from_dict(req.cfg)
    # Parameters start on the meta device and are replaced tensor by tensor.
    with torch.device("meta"):
        model = LLaDAModel(config)
    return _Built(_native(model, req), config.mask_token_id, config.max_sequence_length)


def _build_llada2(req: _Request) -> _Built:
    config = LLaDA2Config.from_dict(req.cfg)
    with torch.device("meta"):
        model = LLaDA2Model(config)
    return _Built(_native(model, req), config.mask_token_id, config.max_position_embeddings)


def _build_dream(req: _Request) -> _Built:
    config = DreamConfig.from_dict(req.cfg)
    with torch.device("meta"):
        model = DreamModel(config)
    return _Built(_native(model, req), config.mask_token_id, config.max_position_embeddings)


def _build_diffusion_gemma(req: _Request) -> _Built:
    text = req.cfg.get("text_config") or {}
    model = load_pretrained("DiffusionGemmaForBlockDiffusion", req.root, req.dtype, req.device)
    # Uniform-noise block diffusion: canvases start random, there is no mask token.
    return _Built(model, None, get_int(text, "max_position_embeddings"))


def _build_ar(req: _Request) -> _Built:
    hf = load_pretrained(
        "AutoModelForCausalLM", req.root, req.dtype, req.device, req.trust_remote_code
    )
    keys = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
    max_len = get_int(req.cfg, *keys, default=0)
    if max_len == 0:
        logger.warning(
            "{}: config.json gives no context length; assuming {}", req.root, _FALLBACK_MAX_LEN
        )
        max_len = _FALLBACK_MAX_LEN
    return _Built(CausalLM(hf).eval(), None, max_len)


# kind -> (model_type values, architecture names, builder)
_KINDS: dict[ModelKind, tuple[tuple[str, ...], tuple[str, ...], Callable[[_Request], _Built]]] = {
    "llada": (("llada",), ("LLaDAModelLM",), _build_llada),
    "dream": (("dream",), ("DreamModel",), _build_dream),
    "llada2": (("llada2_moe",), ("LLaDA2MoeModelLM",), _build_llada2),
    "diffusion_gemma": (
        ("diffusion_gemma",),
        ("DiffusionGemmaForBlockDiffusion",),
        _build_diffusion_gemma,
    ),
}


def supported_architectures() -> list[str]:
    names = [arch for _, archs, _ in _KINDS.values() for arch in archs]
    return [*names, "any transformers causal LM (autoregressive fallback)"]


def load_model(
    path: str,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    tokenizer_path: str | None = None,
    chat_template: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    download_dir: str | None = None,
    tokenizer_revision: str | None = None,
) -> LoadedModel:
    """Load ``path``: a checkpoint directory, or a Hugging Face id at ``revision`` (cached
    in ``download_dir``, by default huggingface_hub's cache); a ``tokenizer_path`` id is read
    at ``tokenizer_revision``."""
    source = hub.locate(path, files=hub.CONFIG_FILES, revision=revision, download_dir=download_dir)
    if source.repo_id is None and revision:
        logger.warning(
            "--revision {} applies to Hugging Face ids; {} is a local directory, served as it is",
            revision,
            path,
        )
    cfg = read_config(source.root)
    kind = detect_kind(cfg, trust_remote_code)
    if trust_remote_code and kind in _KINDS:
        logger.info(
            "--trust-remote-code: {} is built in, so the checkpoint's own code is "
            "neither downloaded nor run",
            kind,
        )
    if source.repo_id is not None:
        remote = kind == "ar" and trust_remote_code and bool(cfg.get("auto_map"))
        files = (*hub.MODEL_FILES, *(hub.REMOTE_CODE_FILES if remote else ()))
        source = hub.fetch(source, files)
        hub.check_complete(source)
    root = source.root
    # Before the weights: a wrong --tokenizer fails in seconds, not after loading them.
    if tokenizer_path is None and tokenizer_revision and source.repo_id is not None:
        tokenizer_path = path  # vLLM's reading: the model's own tokenizer at that revision
    tok_root = _tokenizer_root(tokenizer_path, root, download_dir, tokenizer_revision)
    torch_device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, cfg, torch_device)
    logger.info("loading {} checkpoint {} as {} on {}", kind, root, torch_dtype, torch_device)
    request = _Request(root, cfg, torch_dtype, torch_device, trust_remote_code)
    built = _KINDS[kind][2](request) if kind in _KINDS else _build_ar(request)
    tokenizer = _load_tokenizer(
        tok_root,
        root,
        cfg,
        chat_template,
        trust_remote_code=trust_remote_code and kind == "ar",
    )
    mask_token_id = built.mask_token_id
    if mask_token_id is None and kind in ("llada", "llada2", "dream"):
        mask_token_id = next(
            (i for t in _MASK_TOKENS if (i := tokenizer.token_to_id(t)) is not None), None
        )
    return LoadedModel(
        model=built.model,
        kind=kind,
        # The name the user typed for an id, as vLLM serves it; a directory's own name.
        name=source.repo_id or root.resolve().name,
        path=str(root),
        tokenizer=tokenizer,
        mask_token_id=mask_token_id,
        max_model_len=built.max_model_len,
        dtype=torch_dtype,
        device=torch_device,
    )


def _tokenizer_root(
    spec: str | None, root: Path, download_dir: str | None, revision: str | None
) -> Path:
    """--tokenizer's directory: the checkpoint's own, a local one, or a Hub id's files at
    --tokenizer-revision (as vLLM, --revision is the model's alone)."""
    if spec is None:
        if revision:
            logger.warning(
                "--tokenizer-revision {} applies to Hugging Face ids; the tokenizer of {} is "
                "served as it is",
                revision,
                root,
            )
        return root
    source = hub.locate(
        spec,
        files=hub.TOKENIZER_FILES,
        revision=revision,
        download_dir=download_dir,
        what="tokenizer",
    )
    if source.repo_id is None and revision:
        logger.warning(
            "--tokenizer-revision {} applies to Hugging Face ids; {} is a local directory, "
            "served as it is",
            revision,
            spec,
        )
    if source.repo_id is not None:
        hub.check_complete(source, weights=False)
    return source.root


def read_config(root: Path) -> dict[str, Any]:
    if not root.is_dir():
        raise CheckpointError(f"model directory {root} does not exist")
    config = root / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{root} has no config.json: not a Hugging Face checkpoint")
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointError(f"{config} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{config} must hold a JSON object")
    return cfg


def detect_kind(cfg: dict[str, Any], trust_remote_code: bool = False) -> ModelKind:
    """Which implementation serves this config: a key of ``_KINDS`` or "ar"."""
    model_type = str(cfg.get("model_type", ""))
    archs = [str(a) for a in cfg.get("architectures") or []]
    for kind, (types, names, _) in _KINDS.items():
        if model_type.lower() in types or any(a in names for a in archs):
            return kind
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "ar"
    remote = "AutoModelForCausalLM" in (cfg.get("auto_map") or {})
    if remote and trust_remote_code:
        return "ar"
    shown = ", ".join(archs) or "none"
    hint = (
        "; it ships remote code: --trust-remote-code runs it through transformers" if remote else ""
    )
    raise CheckpointError(
        f"unsupported architecture {shown} (model_type {model_type or 'missing'}){hint}. "
        f"Supported: {', '.join(supported_architectures())}"
    )


def resolve_dtype(requested: str, cfg: dict[str, Any], device: torch.device) -> torch.dtype:
    if requested != "auto":
        if requested not in _DTYPES:
            raise CheckpointError(
                f"unknown dtype {requested!r}; use auto, {', '.join(sorted(_DTYPES))}"
            )
        return _DTYPES[requested]
    saved = _DTYPES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"))
    dtype = saved or torch.float32
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    if device.type == "cuda" and dtype in (torch.float32, torch.bfloat16):
        # GPUs serve in half precision, as vLLM does: bfloat16 where the GPU has it.
        return torch.bfloat16 if cuda_bf16(device) else torch.float16
    return dtype


def cuda_bf16(device: torch.device) -> bool:
    """Whether this GPU computes in bfloat16 natively (Ampere, compute capability 8.0, on)."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def _load_tokenizer(
    tok_root: Path,
    root: Path,
    cfg: dict[str, Any],
    chat_template: str | None,
    trust_remote_code: bool,
) -> Tokenizer:
    eos = _ids(cfg.get("eos_token_id"))
    generation = root / "generation_config.json"
    if generation.is_file():
        eos |= _ids(json.loads(generation.read_text(encoding="utf-8")).get("eos_token_id"))
    try:
        return Tokenizer.from_pretrained(
            str(tok_root),
            chat_template=chat_template,
            extra_eos_ids=eos,
            trust_remote_code=trust_remote_code,
        )
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from exc


def _ids(value: object) -> set[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()

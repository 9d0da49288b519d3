"""Checkpoint loading: pick the implementation from config.json, load weights, tokenizer.

Native implementations (LLaDA, Dream) are built on the meta device and filled from
memory-mapped safetensors; every failure a user can cause is a ``CheckpointError`` whose
message names the file, weight or field at fault.

``dtype="auto"`` uses the checkpoint's ``torch_dtype``, except that half precision
becomes float32 on CPU: CPU half matmuls are slow and the reference outputs are float32.
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

from vdiff_worker.models.dream import DreamConfig, DreamModel
from vdiff_worker.models.errors import CheckpointError
from vdiff_worker.models.llada import LLaDAConfig, LLaDAModel
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


@dataclass
class LoadedModel:
    model: nn.Module  # eval mode, on device, requires_grad False
    kind: str  # "llada" | "dream" | "ar" | "diffusion_gemma"
    name: str  # default served name: the directory's basename
    path: str
    tokenizer: Tokenizer
    mask_token_id: int | None
    max_model_len: int
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class _Built:
    model: nn.Module
    mask_token_id: int | None
    max_model_len: int


def _build_llada(cfg: dict[str, Any]) -> _Built:
    config = LLaDAConfig.from_dict(cfg)
    return _Built(LLaDAModel(config), config.mask_token_id, config.max_sequence_length)


def _build_dream(cfg: dict[str, Any]) -> _Built:
    config = DreamConfig.from_dict(cfg)
    return _Built(DreamModel(config), config.mask_token_id, config.max_position_embeddings)


# kind -> (model_type values, architecture names, builder of a meta-device model)
_NATIVE: dict[str, tuple[tuple[str, ...], tuple[str, ...], Callable[[dict[str, Any]], _Built]]] = {
    "llada": (("llada",), ("LLaDAModelLM",), _build_llada),
    "dream": (("dream",), ("DreamModel",), _build_dream),
}


def supported_architectures() -> list[str]:
    return [arch for _, archs, _ in _NATIVE.values() for arch in archs]


def load_model(
    path: str,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    tokenizer_path: str | None = None,
    chat_template: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    root = Path(path)
    cfg = read_config(root)
    kind = detect_kind(cfg)
    torch_device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, cfg, torch_device)
    logger.info("loading {} checkpoint {} as {} on {}", kind, root, torch_dtype, torch_device)
    # Building a native model needs no memory: parameters start on the meta device
    # and are replaced tensor by tensor from the checkpoint.
    with torch.device("meta"):
        built = _NATIVE[kind][2](cfg)
    load_weights(built.model, root, torch_dtype, torch_device)
    built.model.eval()
    tokenizer = _load_tokenizer(
        Path(tokenizer_path) if tokenizer_path else root, root, cfg, chat_template
    )
    mask_token_id = built.mask_token_id
    if mask_token_id is None:
        mask_token_id = next(
            (i for t in _MASK_TOKENS if (i := tokenizer.token_to_id(t)) is not None), None
        )
    return LoadedModel(
        model=built.model,
        kind=kind,
        name=root.resolve().name,
        path=str(root),
        tokenizer=tokenizer,
        mask_token_id=mask_token_id,
        max_model_len=built.max_model_len,
        dtype=torch_dtype,
        device=torch_device,
    )


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


def detect_kind(cfg: dict[str, Any]) -> str:
    model_type = str(cfg.get("model_type", "")).lower()
    archs = [str(a) for a in cfg.get("architectures") or []]
    for kind, (types, names, _) in _NATIVE.items():
        if model_type in types or any(a in names for a in archs):
            return kind
    shown = ", ".join(archs) or f"model_type {model_type or 'unknown'}"
    raise CheckpointError(
        f"unsupported architecture {shown}; supported: {', '.join(supported_architectures())}"
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
    return dtype


def _load_tokenizer(
    tok_root: Path, root: Path, cfg: dict[str, Any], chat_template: str | None
) -> Tokenizer:
    eos = _ids(cfg.get("eos_token_id"))
    generation = root / "generation_config.json"
    if generation.is_file():
        eos |= _ids(json.loads(generation.read_text(encoding="utf-8")).get("eos_token_id"))
    try:
        return Tokenizer.from_pretrained(
            str(tok_root), chat_template=chat_template, extra_eos_ids=eos
        )
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from exc


def _ids(value: object) -> set[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()

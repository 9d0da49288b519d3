"""Models loaded through transformers (autoregressive fallback, DiffusionGemma)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from vdiff_worker.models.errors import CheckpointError


def load_pretrained(
    class_name: str,
    path: Path,
    dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool = False,
) -> nn.Module:
    """``transformers.<class_name>.from_pretrained`` with its failures as CheckpointError."""
    cls: Any = getattr(transformers, class_name, None)
    if cls is None:
        raise CheckpointError(
            f"transformers {transformers.__version__} has no {class_name}; upgrade transformers"
        )
    # Only the Auto classes know remote code; concrete classes take no such flag.
    extra = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        model: nn.Module = cls.from_pretrained(str(path), dtype=dtype, **extra)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path}: transformers cannot load it: {exc}") from exc
    model.to(device)
    model.requires_grad_(False)
    return model.eval()

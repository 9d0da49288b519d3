"""Memory-mapped safetensors loading into a model built on the meta device.

Each tensor is read once from the mapped file, cast and moved, then put in place of its
meta parameter (or into its rows of a packed one), so peak memory is the model plus one
tensor, never two models. Names are the checkpoint's (see vdiff_worker.models.packing).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from loguru import logger
from safetensors import safe_open
from torch import nn

from vdiff_worker.models.errors import CheckpointError
from vdiff_worker.models.packing import checkpoint_parts

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"


def weight_map(path: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index or the single file."""
    index = path / _INDEX
    if index.is_file():
        try:
            mapping = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
        missing = sorted({f for f in mapping.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{path}: shard(s) named in {_INDEX} are missing: {missing}")
        return {str(k): str(v) for k, v in mapping.items()}
    single = path / _SINGLE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), _SINGLE)
    raise CheckpointError(f"{path} has no {_SINGLE} or {_INDEX}")


def load_weights(model: nn.Module, path: Path, dtype: torch.dtype, device: torch.device) -> None:
    """Fill every parameter of ``model`` from the checkpoint, checking names and shapes.

    A packed parameter is allocated once and its parts copied into their rows as their
    shards come up (parts may sit in different shards)."""
    mapping = weight_map(path)
    params = dict(model.named_parameters())
    sources = checkpoint_parts(model)
    wanted = {part.name: (name, part) for name, parts in sources.items() for part in parts}
    missing = [name for name in wanted if name not in mapping]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise CheckpointError(f"{path}: checkpoint lacks weight(s) {shown}")
    unused = sorted(set(mapping) - set(wanted))
    if unused:
        logger.warning(
            "{}: ignoring {} checkpoint tensor(s), e.g. {}", path, len(unused), unused[0]
        )
    by_shard: dict[str, list[str]] = {}
    for name in wanted:
        by_shard.setdefault(mapping[name], []).append(name)
    shards = sorted(by_shard)
    # Check every shape from the headers first, so a bad checkpoint fails before any load.
    for shard in shards:
        with safe_open(str(path / shard), framework="pt") as f:
            for name in by_shard[shard]:
                param_name, part = wanted[name]
                param = params[param_name]
                expected = list(param.shape)
                if len(sources[param_name]) > 1:
                    expected[0] = part.rows
                _check_shape(f.get_slice(name).get_shape(), expected, name, path)
    packed: dict[str, torch.Tensor] = {}
    for i, shard in enumerate(shards, start=1):
        logger.info(
            "loading shard {}/{}: {} ({} tensors)", i, len(shards), shard, len(by_shard[shard])
        )
        with safe_open(str(path / shard), framework="pt", device=str(device)) as f:
            for name in by_shard[shard]:
                tensor = f.get_tensor(name)
                if tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                param_name, part = wanted[name]
                if len(sources[param_name]) == 1:
                    _set_parameter(model, param_name, tensor)
                    continue
                target = packed.get(param_name)
                if target is None:
                    shape = params[param_name].shape
                    target = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
                    packed[param_name] = target
                    _set_parameter(model, param_name, target)
                target[part.offset : part.offset + part.rows].copy_(tensor)


def _check_shape(got: list[int], expected: list[int], name: str, path: Path) -> None:
    if list(got) != expected:
        raise CheckpointError(
            f"{path}: weight {name} has shape {list(got)}, the config implies {expected}"
        )


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)

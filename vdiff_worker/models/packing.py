"""Linear layers over the same input packed into one matmul, under the checkpoint's names.

Checkpoints store a layer's query, key and value projections (and an MLP's gate and up
projections) as separate tensors; vdiff runs each group as one :class:`Packed` linear: one
kernel instead of three on every pass, which matters most where a pass is a handful of
tokens (a cached block pass) and a launch costs more than its arithmetic. Each output column
is the same dot product either way, so logits are bit for bit those of separate layers.

Checkpoint names stay the model's interface to files: the loader fills a packed weight's
rows from its parts (:func:`checkpoint_parts`), and :func:`checkpoint_state` /
:func:`load_checkpoint_state` translate a whole state dict both ways (training writes
checkpoints in the real layout).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


class Packed(nn.Linear):
    """The checkpoint's linear layers ``parts`` (names beside this module, output widths),
    stacked in that order along the output dimension."""

    def __init__(self, in_features: int, parts: Sequence[tuple[str, int]], bias: bool) -> None:
        super().__init__(in_features, sum(width for _, width in parts), bias=bias)
        self.parts = tuple(parts)


@dataclass(frozen=True)
class Part:
    """Rows ``[offset, offset + rows)`` of a parameter come from checkpoint tensor ``name``."""

    name: str
    offset: int
    rows: int


def checkpoint_parts(model: nn.Module) -> dict[str, list[Part]]:
    """Each parameter's checkpoint tensors: its own name, or a packed layer's parts."""
    packed = {name: m for name, m in model.named_modules() if isinstance(m, Packed)}
    out: dict[str, list[Part]] = {}
    for name, param in model.named_parameters():
        owner, _, attr = name.rpartition(".")
        layer = packed.get(owner)
        if layer is None:
            out[name] = [Part(name, 0, param.shape[0] if param.dim() else 0)]
            continue
        prefix = owner.rpartition(".")[0]
        parts, offset = [], 0
        for part, width in layer.parts:
            parts.append(
                Part(f"{prefix}.{part}.{attr}" if prefix else f"{part}.{attr}", offset, width)
            )
            offset += width
        out[name] = parts
    return out


def checkpoint_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's tensors under the checkpoint's names (packed weights split)."""
    params = dict(model.named_parameters())
    state: dict[str, Tensor] = {}
    for name, parts in checkpoint_parts(model).items():
        tensor = params[name].detach()
        for part in parts:
            state[part.name] = (
                tensor if len(parts) == 1 else tensor[part.offset : part.offset + part.rows]
            )
    return state


def load_checkpoint_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy a state dict in the checkpoint's names into the model; every tensor must fit."""
    parts = checkpoint_parts(model)
    wanted = {p.name for ps in parts.values() for p in ps}
    if set(state) != wanted:
        missing, extra = sorted(wanted - set(state)), sorted(set(state) - wanted)
        raise KeyError(f"state dict does not fit the model: missing {missing}, unexpected {extra}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, ps in parts.items():
            params[name].copy_(
                torch.cat([state[p.name] for p in ps]) if len(ps) > 1 else state[ps[0].name]
            )

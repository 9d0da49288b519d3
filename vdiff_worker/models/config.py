"""Typed reads of config.json values, failing with messages a user can act on."""

from __future__ import annotations

from typing import Any

from vdiff_worker.models.errors import CheckpointError


def get_int(cfg: dict[str, Any], *keys: str, default: int | None = None) -> int:
    """The first of ``keys`` present (and not null) in ``cfg``, as an int."""
    for key in keys:
        value = cfg.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise CheckpointError(f"config.json: '{key}' must be an integer, got {value!r}")
            return value
    if default is None:
        raise CheckpointError(f"config.json lacks '{keys[0]}'")
    return default


def get_float(cfg: dict[str, Any], key: str, default: float) -> float:
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CheckpointError(f"config.json: '{key}' must be a number, got {value!r}")
    return float(value)


def get_bool(cfg: dict[str, Any], key: str, default: bool) -> bool:
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise CheckpointError(f"config.json: '{key}' must be true or false, got {value!r}")
    return value


def require_value(cfg: dict[str, Any], key: str, allowed: tuple[Any, ...], model: str) -> None:
    """Refuse a config that asks for a variant the native implementation does not have."""
    value = cfg.get(key, allowed[0])
    if value not in allowed:
        raise CheckpointError(
            f"{model} checkpoints with {key}={value!r} are not supported "
            f"(supported: {', '.join(repr(a) for a in allowed)})"
        )

"""Decoding strategies, looked up by (model kind, decoding name)."""

from __future__ import annotations

from vdiff_worker.decoding.apd import APD, LLaDAAPD
from vdiff_worker.decoding.autoregressive import Autoregressive
from vdiff_worker.decoding.base import ParamError, Strategy
from vdiff_worker.decoding.dream import DreamReference
from vdiff_worker.decoding.dream_fastdllm import DreamThreshold
from vdiff_worker.decoding.fastdllm import Factor, Threshold
from vdiff_worker.decoding.llada import LLaDAReference
from vdiff_worker.decoding.llada2 import LLaDA2Reference
from vdiff_worker.decoding.llada2_editing import LLaDA2Editing
from vdiff_worker.decoding.model_generate import ModelGenerate

_ALL: list[type[Strategy]] = [
    LLaDAReference,
    Threshold,
    Factor,
    DreamReference,
    APD,
    LLaDAAPD,
    Autoregressive,
    ModelGenerate,
    DreamThreshold,
    LLaDA2Reference,
    LLaDA2Editing,
]


def strategy_for(kind: str, name: str) -> type[Strategy]:
    for cls in _ALL:
        if cls.name == name and kind in cls.kinds:
            return cls
    names = sorted({c.name for c in _ALL if kind in c.kinds})
    raise ParamError(
        "decoding",
        f"decoding '{name}' is not available for {kind} models; "
        f"available: {', '.join(names) or 'none'}",
    )

"""The compiled form of a block's dense arithmetic (``block.cpp``), built on first use.

``block.cpp`` is the arithmetic of ``layers.llama_block`` around attention (the norm,
projection and rotation before it; the output projection, residual and MLP after), the same
ATen calls in the same order, so the logits are the Python block's bit for bit. It saves the
Python between the ops: on a CPU, a small model's pass is bound by that, not by arithmetic
(llada-tiny: a 32-token pass about 12% faster, a 168-token one about 5%, interleaved A/B).

The worker turns it on at start (``enable``) unless the model is compiled (Dynamo would break
its graph at every call) or quantized (torchao's weights dispatch through Python). It is built
by PyTorch's C++ extension builder (a C++ compiler and ninja) into ``TORCH_EXTENSIONS_DIR``
(by default ~/.cache/torch_extensions) once and loaded from there after; where it cannot be
built, the worker says so and runs the Python block, whose outputs are the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loguru import logger

SOURCE = Path(__file__).with_name("block.cpp")
_ops: Any = None


def build() -> Any:
    """The compiled module (built now if it is not yet, which takes a minute on 2 cores)."""
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name="vdiff_block", sources=[str(SOURCE)], extra_cflags=["-O2"], verbose=False
    )


def enable() -> bool:
    """Use the compiled block from now on in this process; False (and the Python block)
    where it cannot be built."""
    global _ops
    try:
        _ops = build()
    except Exception as err:  # noqa: BLE001 - no compiler, no ninja, no writable cache
        logger.warning("the compiled block is not available ({}); using the Python one", err)
        _ops = None
        return False
    return True


def disable() -> None:
    global _ops
    _ops = None


def ops() -> Any:
    """The compiled block's functions while enabled, else None."""
    return _ops


if __name__ == "__main__":  # `python -m vdiff_worker.models.extension`: build it ahead
    build()
    print(f"built {SOURCE.name}")

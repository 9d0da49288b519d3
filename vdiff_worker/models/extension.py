"""The compiled form of a block's dense arithmetic (``block.cpp``), built on first use.

``block.cpp`` is the arithmetic of ``layers.llama_block`` around attention (the norm,
projection and rotation before it; the output projection, residual and MLP after), the same
ATen calls in the same order, so the logits are the Python block's bit for bit. It saves the
Python between the ops: on a CPU, a small model's pass is bound by that, not by arithmetic
(llada-tiny: a 32-token pass about 12% faster, a 168-token one about 5%, interleaved A/B).

The worker turns it on at start (``enable``) unless the model is compiled (Dynamo would break
its graph at every call) or quantized (torchao's weights dispatch through Python). It is built
by PyTorch's C++ extension builder (a C++ compiler and ninja) once, into ``build_directory()``,
and imported from there after (0.1 s, no compiler needed); where it cannot be built, the
worker says so and runs the Python block, whose outputs are the same.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from loguru import logger

SOURCE = Path(__file__).with_name("block.cpp")
_ops: Any = None


def build_directory() -> Path:
    """Where it is built: one directory per source, Python and torch build (torch's version
    names its flavour, +cpu or +cu128), under ``TORCH_EXTENSIONS_DIR`` or PyTorch's default
    root. A library found there is that source's, built for this torch."""
    import torch
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    return Path(root) / f"vdiff_block-{python}-torch{torch.__version__}-{digest}"


def build() -> Any:
    """The compiled module: imported where it was built before (no compiler needed, as in
    the container image, which builds it in its build stage), else built now (half a
    minute on 2 cores; workers starting together build it once)."""
    directory = build_directory()
    library = directory / "vdiff_block.so"
    if library.exists():
        return _imported(library)
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "vdiff.lock", "w") as lock:
        # The kernel drops this lock when its holder dies. PyTorch's own lock file would
        # outlive a worker killed while building, and every later start would wait on it
        # forever; while this lock is held no other build runs, so any such file is stale.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if library.exists():  # built by the worker that held the lock before
            return _imported(library)
        (directory / "lock").unlink(missing_ok=True)
        return cpp_extension.load(
            name="vdiff_block",
            sources=[str(SOURCE)],
            extra_cflags=["-O2"],
            build_directory=str(directory),
            verbose=False,
        )


@functools.cache  # a process initialises an extension module once
def _imported(library: Path) -> Any:
    import torch  # noqa: F401 - the library links against the libraries torch loads

    spec = importlib.util.spec_from_file_location("vdiff_block", library)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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

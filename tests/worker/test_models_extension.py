"""The compiled block gives the Python block's logits bit for bit, in every kind of pass."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import GOLDEN
from tests.worker.drive import slots_for
from vdiff_worker.models import extension, load_model


@pytest.fixture
def compiled() -> Iterator[None]:
    """The compiled block on for the test, off after it (the switch is process-wide)."""
    assert extension.enable(), "the compiled block could not be built"
    yield
    extension.disable()


def both(run: Any) -> tuple[Any, Any]:
    """``run()`` through the Python block, then through the compiled one."""
    extension.disable()
    python = run()
    assert extension.enable()
    return python, run()


@pytest.mark.parametrize("name", ["llada-tiny", "dream-tiny"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_passes_padding_and_picked_rows(
    compiled: None, name: str, dtype: torch.dtype
) -> None:
    model = load_model(str(GOLDEN / name), dtype=str(dtype).removeprefix("torch.")).model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 400, (2, 40), generator=g)
    pos = torch.arange(40).expand(2, 40)
    key_mask = torch.ones(2, 40, dtype=torch.bool)
    key_mask[1, 30:] = False  # the second row is padded
    heads = torch.arange(8, 24).expand(2, 16)
    with torch.no_grad():
        for kwargs in ({}, {"key_mask": key_mask}, {"key_mask": key_mask, "heads": heads}):
            python, native = both(lambda kw=kwargs: model(ids, position_ids=pos, **kw).logits)
            assert python.dtype == dtype
            assert torch.equal(python, native), kwargs


@pytest.mark.parametrize("name", ["llada-tiny", "dream-tiny"])
def test_cached_passes(compiled: None, name: str) -> None:
    """A full pass writing a slot, then a block pass reading it, as the dual cache runs."""
    model = load_model(str(GOLDEN / name)).model
    ids = torch.randint(0, 400, (1, 40), generator=torch.Generator().manual_seed(1))

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        store = slots_for(model, [(1, 0, 40, 40)]).store
        full = model(ids, cache=slots_for(model, [(1, 0, 40, 40)], store)).logits
        block = model(
            ids[:, 24:32],
            cache=slots_for(model, [(1, 24, 8, 40)], store),
            heads=torch.arange(8)[None],
        ).logits
        return full, block

    with torch.no_grad():
        (full, block), (full_native, block_native) = both(run)
    assert torch.equal(full, full_native) and torch.equal(block, block_native)


def test_without_a_compiler_the_python_block_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compiler() -> None:
        raise RuntimeError("ninja is required to load C++ extensions")

    monkeypatch.setattr(extension, "build", no_compiler)
    assert not extension.enable()
    assert extension.ops() is None
    model = load_model(str(GOLDEN / "llada-tiny")).model
    with torch.no_grad():
        assert model(torch.arange(3, 20)[None]).logits.shape == (1, 17, 486)


@pytest.mark.timeout(240)  # PyTorch alone would wait forever
def test_a_build_killed_midway_does_not_hold_later_ones(
    compiled: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """PyTorch's lock file, left by a worker killed while building, is not waited on: the
    next build (here into an empty directory, half a minute) goes ahead."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    directory = extension.build_directory()
    directory.mkdir(parents=True)
    (directory / "lock").touch()
    extension.disable()
    assert extension.enable()
    assert (directory / "vdiff_block.so").exists()
    assert not (directory / "lock").exists()


def test_a_library_built_before_needs_no_compiler(
    compiled: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in the container image: built in its build stage, imported where no compiler is."""
    from torch.utils import cpp_extension

    def no_compiler(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    extension.disable()
    assert extension.enable()
    assert extension.ops() is not None

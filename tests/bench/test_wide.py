"""bench.wide: generated real-layout checkpoints through real servers, one option, every
figure reported (the 256-wide form a CPU can run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import bench.common
from bench.wide import LLADA2_SMALL, generate, main
from vdiff_worker.models import load_model


def test_a_generated_checkpoint_loads_as_its_layout(tmp_path: Path) -> None:
    path = generate("llada2-tiny", LLADA2_SMALL, 2, tmp_path / "l2")
    loaded = load_model(str(path), dtype="bfloat16")
    assert loaded.kind == "llada2" and loaded.mask_token_id == 499
    assert loaded.model.config.num_experts == 32 and loaded.model.config.num_layers == 2
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    # Output rows past the tokenizer's vocabulary are zero: no token it lacks wins.
    assert not loaded.model.lm_head.weight[loaded.tokenizer.vocab_size :].any()


def test_small_run_reports_every_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)  # not over a real run's results
    main(["--small", "--layers", "1", "--options", "sdpa", "--levels", "1", "--max-tokens", "8"])
    report = json.loads((tmp_path / "wide.json").read_text())
    assert set(report["results"]) == {"llada-wide-sdpa", "llada2-wide-sdpa"}
    for modes in report["results"].values():
        for res in modes.values():
            assert "error" not in res
            (lv,) = res["levels"]
            assert lv["tokens_per_s"] > 0 and lv["bound_tokens_per_s"] > 0

"""DiffusionGemma loads through transformers from a tiny random checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

from vdiff_worker.models import CheckpointError, load_model
from vdiff_worker.models import hf as hf_loading

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)

pytestmark = pytest.mark.skipif(
    not hasattr(transformers, "DiffusionGemmaForBlockDiffusion"),
    reason="this transformers has no DiffusionGemma",
)


def build_checkpoint(root: Path) -> Path:
    """A tiny random DiffusionGemma in its transformers layout, with Dream's tokenizer files."""
    text = {
        "vocab_size": 485,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "global_head_dim": 16,
        "max_position_embeddings": 256,
        "sliding_window": 16,
        "layer_types": ["sliding_attention", "full_attention"],
        "num_experts": 2,
        "top_k_experts": 1,
        "moe_intermediate_size": 32,
        "pad_token_id": 480,
        "eos_token_id": 480,
        "bos_token_id": 483,
    }
    vision = {
        "model_type": "gemma4_vision",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "position_embedding_size": 64,
        "patch_size": 4,
    }
    config = transformers.DiffusionGemmaConfig(
        text_config=text, vision_config=vision, canvas_length=8
    )
    torch.manual_seed(0)
    transformers.DiffusionGemmaForBlockDiffusion(config).save_pretrained(str(root))
    for name in TOKENIZER_FILES:
        shutil.copy(GOLDEN / "dream-tiny" / name, root / name)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("diffusion-gemma-tiny"))


def test_loads_as_diffusion_gemma(checkpoint: Path) -> None:
    loaded = load_model(str(checkpoint))
    assert loaded.kind == "diffusion_gemma"
    assert isinstance(loaded.model, transformers.DiffusionGemmaForBlockDiffusion)
    assert loaded.mask_token_id is None
    assert loaded.max_model_len == 256
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    prompt = torch.tensor(
        [loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])]
    )
    torch.manual_seed(0)
    with torch.no_grad():
        out = loaded.model.generate(prompt, max_new_tokens=8)
    assert out.sequences.shape == (1, prompt.shape[1] + 8)


def test_half_precision_on_request(checkpoint: Path) -> None:
    loaded = load_model(str(checkpoint), dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_refused_when_transformers_lacks_it(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hf_loading, "transformers", SimpleNamespace(__version__="4.50.0"))
    with pytest.raises(CheckpointError, match="transformers 4.50.0 has no DiffusionGemma"):
        load_model(str(checkpoint))

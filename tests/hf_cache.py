"""A Hugging Face cache built by hand, laid out as huggingface_hub writes one.

``models--ORG--NAME/blobs/<sha256>`` holds each file's bytes once, ``snapshots/<commit>/<file>``
is a relative link to its blob and ``refs/<branch>`` holds the commit a branch points at.
Tests point ``HF_HUB_CACHE`` (or ``--download-dir``) here with ``HF_HUB_OFFLINE=1``: the real
library resolves ids in it and nothing reaches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
INDEX = "model.safetensors.index.json"


def repo_dir(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def add_snapshot(
    cache: Path, repo_id: str, files: dict[str, bytes], *, refs: tuple[str, ...] = ("main",)
) -> str:
    """Store ``files`` as one commit of ``repo_id`` that ``refs`` point at; its hash."""
    commit = hashlib.sha1(
        repo_id.encode()
        + b"".join(
            name.encode() + hashlib.sha256(data).digest() for name, data in sorted(files.items())
        )
    ).hexdigest()
    repo = repo_dir(cache, repo_id)
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        link = snapshot / name
        if not link.is_symlink():
            link.symlink_to(os.path.join("..", "..", "blobs", blob))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as the library writes it
    return commit


def checkpoint_files(src: Path, **config: Any) -> dict[str, bytes]:
    """The files of checkpoint directory ``src``; ``config`` overrides config.json fields."""
    files = {p.name: p.read_bytes() for p in sorted(src.iterdir()) if p.is_file()}
    if config:
        cfg = json.loads(files["config.json"]) | config
        files["config.json"] = json.dumps(cfg, indent=2).encode()
    return files


def sharded_files(src: Path, scratch: Path, dtype: torch.dtype | None = None) -> dict[str, bytes]:
    """``src`` with its weights split in two shards and an index, as large models ship;
    with ``dtype``, its floating-point weights in that dtype (and config.json saying so)."""
    tensors = load_file(str(src / "model.safetensors"))
    if dtype is not None:
        tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
    names = sorted(tensors)
    files = checkpoint_files(src, **({"torch_dtype": str(dtype)[6:]} if dtype else {}))
    del files["model.safetensors"]
    weight_map: dict[str, str] = {}
    scratch.mkdir(parents=True, exist_ok=True)
    for shard, keys in zip(SHARDS, (names[::2], names[1::2])):
        save_file({k: tensors[k] for k in keys}, str(scratch / shard))
        files[shard] = (scratch / shard).read_bytes()
        weight_map |= dict.fromkeys(keys, shard)
    files[INDEX] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    return files

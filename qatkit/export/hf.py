"""A model holding a GGUF file's values -> a Hugging Face checkpoint directory (float32
safetensors, config with qatkit's provenance, tokenizer with its chat template, generation
config) that transformers loads and llama.cpp's converter reads. Why float32: targets/hf.py."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import QatkitError
from ..atomic import atomic_path


def write_hf(model: torch.nn.Module, tokenizer, out: str | os.PathLike, provenance: dict) -> dict:
    """Write the directory atomically (nothing at `out` unless it is whole); returns {"path", "bytes"}."""
    out = Path(out)
    bad = [n for n, p in model.state_dict().items() if p.is_floating_point() and p.dtype != torch.float32]
    if bad:
        raise QatkitError(f"{bad[0]} is {model.state_dict()[bad[0]].dtype}: the checkpoint must be float32 to hold the file's values exactly")
    config = model.config
    config.qatkit = provenance
    try:
        with atomic_path(out, folder=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    finally:
        del config.qatkit
    return {"path": str(out), "bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())}

"""The export gap: llama.cpp's logits on a GGUF file vs the torch model carrying the very same
(dequantized) weights, with and without the runtime-faithful mode. Zero means llama.cpp computes
what the trained student computed."""

from __future__ import annotations

import copy

import torch

from ..export.gguf import load_gguf_weights
from ..metrics import compare
from ..models.arch import Arch
from ..runtime.faithful import llamacpp_faithful
from ..runtime.llamacpp import adds_bos, chunk_logits, open_model, tokenize


def export_gap(twin: torch.nn.Module, types: dict[str, str], path: str, text: str, n_tokens: int = 512) -> dict:
    """{"plain": ..., "faithful": ...}: llama.cpp on `path` vs `twin`, a torch model that already
    carries the file's dequantized weights (`load_gguf_weights`, which also gives `types`), over the
    first n_tokens of `text` (BOS first)."""
    llm = open_model(path, n_ctx=n_tokens)
    ids = (([llm.token_bos()] if adds_bos(llm) else []) + tokenize(llm, text))[:n_tokens]
    ref = chunk_logits(llm, ids)
    del llm
    x = torch.tensor([ids])
    with torch.no_grad():
        plain = twin(x).logits[0].float().numpy()
        with llamacpp_faithful(twin, types):
            faithful = twin(x).logits[0].float().numpy()
    return {"tokens": len(ids), "plain": compare(ref, plain), "faithful": compare(ref, faithful)}


def file_twin(model: torch.nn.Module, arch: Arch, path: str) -> tuple[torch.nn.Module, dict[str, str]]:
    """A copy of `model` carrying the weights of the GGUF file `path` (what llama.cpp computes with)."""
    twin = copy.deepcopy(model)
    return twin, load_gguf_weights(twin, arch, path)

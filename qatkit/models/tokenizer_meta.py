"""A transformers tokenizer -> the `tokenizer.ggml.*` metadata llama.cpp loads.

Two kinds, chosen the way llama.cpp's converter chooses them, from the tokenizer itself:
- byte-level BPE (GPT-2 style: Llama 3, Qwen): model "gpt2", tokens + merges;
- BPE with byte fallback (SentencePiece style: Gemma, Llama 2): model "llama", tokens with
  scores (earlier id = higher priority) and byte tokens <0xNN> typed BYTE;
- Gemma 4's: the same BPE with byte fallback, but written as model "gemma4" with its merges,
  every score -1000 and the chat-format tokens typed USER_DEFINED (so that they are rendered),
  as llama.cpp's converter writes it (conversion/gemma.py, Gemma4Model.set_vocab).
"""

from __future__ import annotations

import json

from .. import QatkitError
from .gguf_meta import GEMMA4_ARCHS, Metadata

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer names llama.cpp knows, by family (the converter identifies them by hashing the
# tokenization of a probe text; qatkit goes by family and lets the caller override).
PRE_BY_ARCH = {"llama": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2", "gemma3": "default"}
# Gemma 4's tokens the converter types USER_DEFINED: always rendered, so a chat parser can read them
GEMMA4_VISIBLE = frozenset({"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>'})


def _is_byte_token(tok: str) -> bool:
    """A byte-fallback token such as <0x0A>."""
    return len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">")


def tokenizer_metadata(tokenizer, vocab_size: int, arch_name: str, pre: str | None = None) -> Metadata:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise QatkitError(f"tokenizer {type(tokenizer).__name__} has no fast (tokenizers) backend; qatkit needs tokenizer.json")
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE":
        raise QatkitError(f"tokenizer model type {model.get('type')!r} is not supported (supported: BPE)")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t.content: i for i, t in tokenizer.added_tokens_decoder.items()}
    vocab.update(added)
    special = set(getattr(tokenizer, "all_special_ids", []))
    if max(vocab.values()) >= vocab_size:
        raise QatkitError(f"tokenizer has ids up to {max(vocab.values())} but the model's vocabulary is {vocab_size}")

    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = CONTROL if i in special else USER_DEFINED if tok in added else NORMAL
    byte_fallback = bool(model.get("byte_fallback"))
    meta: Metadata = {"tokenizer.ggml.tokens": ["ARRAY", "STRING", tokens]}
    gemma4 = arch_name in GEMMA4_ARCHS  # (the drafter's file carries the target's tokenizer)
    if gemma4:
        if not byte_fallback:
            raise QatkitError("gemma4: the tokenizer must be a BPE with byte fallback, as Gemma's is")
        base = len(model["vocab"])
        for tok, i in vocab.items():
            types[i] = (BYTE if _is_byte_token(tok) and i < base else CONTROL if i in special else
                        USER_DEFINED if tok in GEMMA4_VISIBLE or i >= base else NORMAL)
        meta["tokenizer.ggml.model"] = ["STRING", "gemma4"]
        meta["tokenizer.ggml.scores"] = ["ARRAY", "FLOAT32", [-1000.0] * vocab_size]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        if merges:
            meta["tokenizer.ggml.merges"] = ["ARRAY", "STRING", merges]
        meta["tokenizer.ggml.add_space_prefix"] = ["BOOL", False]
    elif byte_fallback:
        meta["tokenizer.ggml.model"] = ["STRING", "llama"]
        for i, tok in enumerate(tokens):
            if _is_byte_token(tok):
                types[i] = BYTE
        if model.get("unk_token") in vocab:
            types[vocab[model["unk_token"]]] = UNKNOWN
        meta["tokenizer.ggml.scores"] = ["ARRAY", "FLOAT32", [0.0 if types[i] != NORMAL else -float(i) for i in range(vocab_size)]]
    else:
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        meta["tokenizer.ggml.model"] = ["STRING", "gpt2"]
        meta["tokenizer.ggml.pre"] = ["STRING", pre or PRE_BY_ARCH.get(arch_name, "default")]
        if merges:
            meta["tokenizer.ggml.merges"] = ["ARRAY", "STRING", merges]
    meta["tokenizer.ggml.token_type"] = ["ARRAY", "INT32", types]

    for key, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id), ("unknown", tokenizer.unk_token_id), ("padding", tokenizer.pad_token_id)):
        if tid is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = ["UINT32", int(tid)]
    probe = tokenizer("a")["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and (probe[:1] == [tokenizer.bos_token_id] or gemma4)  # llama.cpp forces it for gemma4
    meta["tokenizer.ggml.add_bos_token"] = ["BOOL", add_bos]
    meta["tokenizer.ggml.add_eos_token"] = ["BOOL", tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id] and len(probe) > 1]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        meta["tokenizer.chat_template"] = ["STRING", template]
    return meta

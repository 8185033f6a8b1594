"""A tiny llama-architecture GGUF that llama.cpp loads, made from a seed in well under a second.

Tokenizer: GPT-2 style byte-level BPE. The first 256 tokens are the byte-level characters (byte b
is token b's text after GPT-2's byte-to-unicode map), then three merged tokens (" t", "he",
" the") and two control tokens, BOS and EOS. With add_bos_token set, llama.cpp's perplexity
method takes the BOS path, as it does for the real default model.

GGUF lists a tensor's dimensions fastest-first (ggml ne), the reverse of numpy: a numpy (out, in)
weight is ne=[in, out], which is what llama.cpp expects of a linear layer. GGUFWriter.add_tensor
takes the numpy array as-is and does the reversal itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np


@dataclass(frozen=True)
class TinyConfig:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 128
    context: int = 512
    std: float = 0.05  # decoder weights
    out_std: float = 0.3  # output head: spreads the logits so the distribution is not flat
    seed: int = 0
    n_merges: int = 3  # fewer gives a smaller vocab (a tokenizer that differs)


def byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode map: printable bytes map to themselves, the rest to U+0100 onward."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def vocab(n_merges: int = 3) -> tuple[list[str], list[int], list[str], int, int]:
    """(tokens, token types, merges, bos id, eos id)."""
    chars = byte_chars()
    space = chars[ord(" ")]  # "Ġ"
    merged = [space + "t", "he", space + "the"][:n_merges]
    merges = [f"{space} t", "h e", f"{space}t he"][:n_merges]
    tokens = chars + merged + ["<|bos|>", "<|eos|>"]
    types = [gguf.TokenType.NORMAL] * (256 + len(merged)) + [gguf.TokenType.CONTROL] * 2
    return tokens, [int(t) for t in types], merges, len(tokens) - 2, len(tokens) - 1


def write_tiny_llama(path, cfg: TinyConfig = TinyConfig()) -> str:
    """Write a random tiny llama GGUF (all tensors F32) to `path`; returns the path as str."""
    tokens, types, merges, bos, eos = vocab(cfg.n_merges)
    head_dim = cfg.hidden // cfg.heads
    rng = np.random.default_rng(cfg.seed)

    def w(*shape, std=cfg.std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm():
        return (1.0 + rng.standard_normal(cfg.hidden) * 0.1).astype(np.float32)

    wr = gguf.GGUFWriter(str(path), "llama")
    wr.add_name("qatkit-tiny")
    wr.add_context_length(cfg.context)
    wr.add_embedding_length(cfg.hidden)
    wr.add_block_count(cfg.layers)
    wr.add_feed_forward_length(cfg.ffn)
    wr.add_head_count(cfg.heads)
    wr.add_head_count_kv(cfg.kv_heads)
    wr.add_layer_norm_rms_eps(1e-5)
    wr.add_rope_freq_base(10000.0)
    wr.add_rope_dimension_count(head_dim)
    wr.add_file_type(gguf.LlamaFileType.ALL_F32)
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("default")
    wr.add_token_list(tokens)
    wr.add_token_types(types)
    wr.add_token_merges(merges)
    wr.add_bos_token_id(bos)
    wr.add_eos_token_id(eos)
    wr.add_add_bos_token(True)

    n_vocab = len(tokens)
    wr.add_tensor("token_embd.weight", w(n_vocab, cfg.hidden, std=1.0))
    for i in range(cfg.layers):
        p = f"blk.{i}."
        wr.add_tensor(p + "attn_norm.weight", norm())
        wr.add_tensor(p + "attn_q.weight", w(cfg.heads * head_dim, cfg.hidden))
        wr.add_tensor(p + "attn_k.weight", w(cfg.kv_heads * head_dim, cfg.hidden))
        wr.add_tensor(p + "attn_v.weight", w(cfg.kv_heads * head_dim, cfg.hidden))
        wr.add_tensor(p + "attn_output.weight", w(cfg.hidden, cfg.heads * head_dim))
        wr.add_tensor(p + "ffn_norm.weight", norm())
        wr.add_tensor(p + "ffn_gate.weight", w(cfg.ffn, cfg.hidden))
        wr.add_tensor(p + "ffn_up.weight", w(cfg.ffn, cfg.hidden))
        wr.add_tensor(p + "ffn_down.weight", w(cfg.hidden, cfg.ffn))
    wr.add_tensor("output_norm.weight", norm())
    wr.add_tensor("output.weight", w(n_vocab, cfg.hidden, std=cfg.out_std))

    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return str(path)

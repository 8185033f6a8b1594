"""A gemma4 GGUF -> a float Hugging Face directory (Gemma4ForCausalLM), read by qatkit itself.

transformers 5.24 cannot read a gemma4 GGUF back: its config validation refuses the per-layer
arrays llama.cpp's converter writes (feed_forward_length with the double-wide MLP, head_count_kv
with per-layer KV heads). This reader inverts models/gemma4.py's keys into a Gemma4TextConfig,
dequantizes every tensor the model has (names through the arch table, so nothing is silently
dropped or left at its initial value), and rebuilds the tokenizer from tokenizer.ggml.* the way
llama.cpp's gemma4 tokenizer runs it: BPE over the whole text with '▁' for spaces and byte
fallback, newline runs split off first.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .. import QatkitError
from . import gguf_meta
from .gemma4 import FULL, SLIDING, UNROTATED

CONTROL = 3


def text_config(meta: gguf_meta.Metadata, shapes: dict[str, tuple[int, ...]], rope_freqs: np.ndarray | None):
    """The Gemma4TextConfig the file was converted from (what llama.cpp reads of it); `shapes`:
    the file's tensors' numpy-order shapes."""
    from transformers import Gemma4TextConfig

    def key(name, default=None):
        v = gguf_meta.get(meta, f"gemma4.{name}", default)
        if v is None:
            raise QatkitError(f"gemma4 GGUF: metadata key gemma4.{name} missing")
        return v

    n = int(key("block_count"))
    swa = [bool(x) for x in key("attention.sliding_window_pattern")]
    types = [SLIDING if s else FULL for s in swa]
    ff = key("feed_forward_length")
    ff = list(ff) if isinstance(ff, list) else [ff] * n
    shared = int(key("attention.shared_kv_layers", 0))
    kv = key("attention.head_count_kv")
    kv = list(kv) if isinstance(kv, list) else [kv] * n
    head_full, head_swa = int(key("attention.key_length")), int(key("attention.key_length_swa"))
    if rope_freqs is None:
        raise QatkitError("gemma4 GGUF: no rope_freqs tensor (the full layers' proportional RoPE)")
    rotated = int((np.asarray(rope_freqs) < UNROTATED / 2).sum())
    kw = dict(
        vocab_size=shapes["token_embd.weight"][0], hidden_size=int(key("embedding_length")), intermediate_size=int(ff[0]),
        num_hidden_layers=n, num_attention_heads=int(key("attention.head_count")), num_key_value_heads=int(kv[swa.index(True)] if any(swa) else kv[0]),
        head_dim=head_swa, global_head_dim=head_full, max_position_embeddings=int(key("context_length")),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")), layer_types=types, sliding_window=int(key("attention.sliding_window")),
        final_logit_softcapping=gguf_meta.get(meta, "gemma4.final_logit_softcapping"), num_kv_shared_layers=shared,
        use_double_wide_mlp=any(f != ff[0] for f in ff), tie_word_embeddings=True,
        rope_parameters={SLIDING: {"rope_type": "default", "rope_theta": float(key("rope.freq_base_swa"))},
                         FULL: {"rope_type": "proportional", "partial_rotary_factor": 2 * rotated / head_full, "rope_theta": float(key("rope.freq_base"))}},
    )
    ple = int(key("embedding_length_per_layer_input", 0))
    kw["hidden_size_per_layer_input"] = ple
    if ple:
        kw["vocab_size_per_layer_input"] = shapes["per_layer_token_embd.weight"][0]
    full_v = [f"blk.{i}.attn_v.weight" in shapes for i, t in enumerate(types[: n - shared]) if t == FULL]
    kw["attention_k_eq_v"] = bool(full_v) and not any(full_v)
    if kw["attention_k_eq_v"] and FULL in types:
        kw["num_global_key_value_heads"] = int(kv[types.index(FULL)])
    if gguf_meta.get(meta, "gemma4.expert_count"):
        kw.update(enable_moe_block=True, num_experts=int(key("expert_count")), top_k_experts=int(key("expert_used_count")),
                  moe_intermediate_size=int(key("expert_feed_forward_length")))
    for tid, name in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        v = gguf_meta.get(meta, f"tokenizer.ggml.{tid}_token_id")
        if v is not None:
            kw[name] = int(v)
    try:
        return Gemma4TextConfig(**kw)
    except Exception as e:  # transformers' own validation of what the file says
        raise QatkitError(f"gemma4 GGUF: its hyper-parameters make no Gemma4TextConfig ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def tokenizer(meta: gguf_meta.Metadata):
    """The file's Gemma 4 tokenizer as a transformers fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    if gguf_meta.get(meta, "tokenizer.ggml.model") != "gemma4":
        raise QatkitError(f"gemma4 GGUF: tokenizer model {gguf_meta.get(meta, 'tokenizer.ggml.model')!r}, expected 'gemma4'")
    tokens = gguf_meta.get(meta, "tokenizer.ggml.tokens")
    types = gguf_meta.get(meta, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in gguf_meta.get(meta, "tokenizer.ggml.merges", [])]
    ids = {t: i for i, t in enumerate(tokens)}
    special = {i: t for i, t in enumerate(tokens) if types[i] == CONTROL}
    name = {}
    for key in ("bos", "eos", "unknown", "padding"):
        tid = gguf_meta.get(meta, f"tokenizer.ggml.{key}_token_id")
        if tid is not None:
            name[key] = tokens[int(tid)]
    tok = Tokenizer(models.BPE(vocab=ids, merges=merges, unk_token=name.get("unknown"), byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("\n+"), "isolated")  # llama.cpp's gemma4 pre-tokenizer: newline runs apart
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(list(special.values()))
    if "bos" in name:
        bos = name["bos"]
        tok.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, ids[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=name.get("bos"), eos_token=name.get("eos"), unk_token=name.get("unknown"),
                                   pad_token=name.get("padding"))


def convert(reader, meta: gguf_meta.Metadata, path: Path, dest: Path) -> None:
    """Write the float Hugging Face directory of the gemma4 GGUF `path` (already open: `reader`,
    its metadata `meta`) into `dest` (a folder being made; load.py writes it atomically)."""
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from ..formats import BY_GGML_TYPE, decode
    from .arch import ARCHS, from_gguf_tensor, gguf_name

    raw = {t.name: t for t in reader.tensors}
    shapes = {name: tuple(int(x) for x in reversed(t.shape.tolist())) for name, t in raw.items()}
    freqs = raw.get("rope_freqs.weight")
    config = text_config(meta, shapes, None if freqs is None else np.asarray(freqs.data, dtype=np.float32))
    arch = ARCHS["gemma4"]
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    state = {}
    for hf, p in skeleton.state_dict().items():
        if hf == "lm_head.weight":
            continue  # tied to the token embedding
        name = gguf_name(arch, hf)
        if name not in raw:
            raise QatkitError(f"{path}: tensor {name} missing (the model's config makes it {tuple(p.shape)})")
        t = raw[name]
        if shapes[name] != tuple(p.shape):
            raise QatkitError(f"{path}: tensor {name} is {shapes[name]}, but the file's own hyper-parameters make it {tuple(p.shape)}")
        if int(t.tensor_type) in BY_GGML_TYPE:
            values = decode(np.asarray(t.data), int(t.tensor_type), shapes[name])
        else:  # any other ggml type gguf-py can dequantize (a K-quant teacher, say)
            values = dequantize(np.asarray(t.data), t.tensor_type).reshape(shapes[name])
        w = from_gguf_tensor(arch, config, name, torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)))
        state[hf] = w.float().contiguous()
    dest.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(dest)
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    tokenizer(meta).save_pretrained(dest)
    (dest / "generation_config.json").write_text(json.dumps({k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}))

"""Gemma 4 (transformers `gemma4_text`; llama.cpp arch `gemma4`): what its GGUF file holds beyond
the common decoder, as llama.cpp's converter writes it (conversion/gemma.py, Gemma4Model).

Read from the checkpoint's own config.json (`config.to_dict()`: the Gemma4TextConfig defaults
match no released model, and full-attention layers keep their head size in `per_layer_config`):
- per-layer embeddings (PLE): `embedding_length_per_layer_input`, 0 when the model has none;
- two attention shapes: full layers' head size as key/value_length and rope.dimension_count,
  sliding layers' as the `_swa` keys; the sliding pattern as a bool per layer;
- the last `shared_kv_layers` layers reuse K/V of earlier ones; with the double-wide MLP their
  feed-forward length doubles, so feed_forward_length becomes a per-layer array;
- proportional RoPE on full layers, emulated in llama.cpp by the `rope_freqs` tensor: factor 1
  for the rotated pairs and 1e30 (no rotation) for the rest of a full head's pairs.

Layouts llama.cpp cannot run are refused here, before a file is written: its KV-cache map sends
a shared sliding layer to layer n-2 and a shared full layer to layer n-1 (n = the first shared
layer), which is what transformers does only when layer n-1 is full and n-2 sliding; any other
layout makes llama.cpp abort while loading (GGML_ASSERT in llama-kv-cache.cpp).
"""

from __future__ import annotations

import torch

from .. import QatkitError

SLIDING, FULL = "sliding_attention", "full_attention"
TEXT_TYPES = ("gemma4_text", "gemma4_unified_text")  # the decoders: E2B/E4B/26B/31B, and the 12B "unified" one
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")  # the MoE experts' 3-D Parameters: (experts, 2 x ffn, hidden), (experts, hidden, ffn)
UNROTATED = 1e30  # llama.cpp's rope frequency divisor for a pair that does not rotate

# The released text decoders' shapes (../shared/GEMMA4.md, "Typical values"; third-party copies of
# their config.json), for sizing without weights: memory estimates (qatkit train --dry-run,
# benchmarks/memory.py) and tests. The 12B's are not known well enough to list.
_COMMON = dict(vocab_size=262144, head_dim=256, global_head_dim=512, final_logit_softcapping=30.0, tie_word_embeddings=True)
REFERENCE_SHAPES = {
    "E2B": dict(_COMMON, vocab_size_per_layer_input=262144, hidden_size=1536, intermediate_size=6144, num_hidden_layers=35, num_attention_heads=8,
                num_key_value_heads=1, hidden_size_per_layer_input=256, num_kv_shared_layers=20, use_double_wide_mlp=True,
                layer_types=([SLIDING] * 4 + [FULL]) * 7, sliding_window=512),
    "E4B": dict(_COMMON, vocab_size_per_layer_input=262144, hidden_size=2560, intermediate_size=10240, num_hidden_layers=42, num_attention_heads=8,
                num_key_value_heads=2, hidden_size_per_layer_input=256, num_kv_shared_layers=18, use_double_wide_mlp=False,
                layer_types=([SLIDING] * 5 + [FULL]) * 7, sliding_window=512),
    "26B-A4B": dict(_COMMON, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16, num_key_value_heads=8,
                    num_global_key_value_heads=2, attention_k_eq_v=True, hidden_size_per_layer_input=0, num_kv_shared_layers=0,
                    enable_moe_block=True, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
                    layer_types=([SLIDING] * 5 + [FULL]) * 5, sliding_window=1024),
}


def reference_config(name: str):
    """A Gemma4TextConfig of one of REFERENCE_SHAPES."""
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(**REFERENCE_SHAPES[name])


def _raw(config) -> dict:
    return config.to_dict()


def _full_layer_override(d: dict, key: str):
    """A full-attention layer's own value of `key` (per_layer_config), or None."""
    types = d.get("layer_types") or []
    for idx, over in sorted((d.get("per_layer_config") or {}).items(), key=lambda kv: int(kv[0])):
        i = int(idx)
        if i < len(types) and types[i] == FULL and key in over:
            return over[key]
    return d.get(f"global_{key}") if key == "head_dim" else None


def check(config, drafter: bool = False) -> None:
    """Refuse a Gemma 4 text config qatkit or llama.cpp cannot run, in one line. `drafter`: the
    text config of an MTP drafter (see `check_assistant`)."""
    d = _raw(config)
    types = d.get("layer_types") or []
    n = d["num_hidden_layers"]
    if len(types) != n or set(types) - {SLIDING, FULL}:
        raise QatkitError(f"gemma4: layer_types must name {n} layers, each sliding_attention or full_attention")
    if d.get("use_bidirectional_attention") == "all":  # "vision" concerns image tokens only: text stays causal
        raise QatkitError("gemma4: use_bidirectional_attention='all' is not supported (text decoding is causal)")
    rope = d.get("rope_parameters") or {}
    full, sliding = rope.get(FULL) or {}, rope.get(SLIDING) or {}
    if full.get("rope_type") != "proportional" or sliding.get("rope_type", "default") != "default":
        raise QatkitError(f"gemma4: rope {full.get('rope_type')!r} / {sliding.get('rope_type')!r} on full / sliding layers; llama.cpp's gemma4 takes proportional / default")
    if _full_layer_override(d, "head_dim") is None:
        raise QatkitError("gemma4: no head size for the full-attention layers (per_layer_config or global_head_dim)")
    shared = int(d.get("num_kv_shared_layers") or 0)
    if drafter or shared == n:  # (every layer reading another model's K/V: a drafter's decoder)
        off = [k for k in ("hidden_size_per_layer_input", "enable_moe_block", "use_double_wide_mlp") if d.get(k)]
        if shared != n or off:
            why = f"{', '.join(off)} set" if off else f"{shared} of its {n} layers read the target's K/V"
            raise QatkitError(f"gemma4 drafter: every layer must read the target's K/V, without per-layer embeddings, MoE or double-wide MLP ({why})")
    elif shared:
        first = n - shared
        if first < 2 or types[first - 1] != FULL or types[first - 2] != SLIDING:
            got = ", ".join(types[max(0, first - 2):first]) or "none"
            raise QatkitError(f"gemma4: the {shared} KV-sharing layers need layer {first - 1} full and layer {first - 2} sliding before them "
                              f"(got {got}); llama.cpp maps them that way and aborts on any other layout")


def hparams(config, a: str = "gemma4", drafter: bool = False) -> dict:
    """The `gemma4.*` keys (`a`.*), valued and typed as the converter writes them ([type, value]
    or ["ARRAY", type, list] entries for gguf_meta)."""
    check(config, drafter)
    d = _raw(config)
    n = d["num_hidden_layers"]
    u32 = lambda v: ["UINT32", int(v)]  # noqa: E731
    f32 = lambda v: ["FLOAT32", float(v)]  # noqa: E731
    types = d["layer_types"]
    swa = [t == SLIDING for t in types]
    head_full, head_swa = int(_full_layer_override(d, "head_dim")), int(d["head_dim"])
    rope = d["rope_parameters"]
    out = {
        f"{a}.block_count": u32(n),
        f"{a}.context_length": u32(d["max_position_embeddings"]),
        f"{a}.embedding_length": u32(d["hidden_size"]),
        f"{a}.feed_forward_length": u32(d["intermediate_size"]),
        f"{a}.attention.head_count": u32(d["num_attention_heads"]),
        f"{a}.attention.head_count_kv": u32(d["num_key_value_heads"]),
        f"{a}.rope.freq_base": f32(rope[FULL]["rope_theta"]),
        f"{a}.rope.freq_base_swa": f32(rope[SLIDING]["rope_theta"]),
        f"{a}.attention.layer_norm_rms_epsilon": f32(d["rms_norm_eps"]),
        f"{a}.attention.key_length": u32(head_full),
        f"{a}.attention.value_length": u32(head_full),
        f"{a}.attention.sliding_window": u32(d["sliding_window"]),
        f"{a}.attention.shared_kv_layers": u32(d.get("num_kv_shared_layers") or 0),
        f"{a}.embedding_length_per_layer_input": u32(d.get("hidden_size_per_layer_input") or 0),
        f"{a}.attention.sliding_window_pattern": ["ARRAY", "BOOL", swa],
        f"{a}.attention.key_length_swa": u32(head_swa),
        f"{a}.attention.value_length_swa": u32(head_swa),
        f"{a}.rope.dimension_count": u32(head_full),  # the whole head: rope_freqs says which pairs turn
        f"{a}.rope.dimension_count_swa": u32(int(head_swa * float(rope[SLIDING].get("partial_rotary_factor", 1.0)))),
    }
    if d.get("enable_moe_block"):
        out[f"{a}.expert_count"] = u32(d["num_experts"])
        out[f"{a}.expert_used_count"] = u32(d["top_k_experts"])
        out[f"{a}.expert_feed_forward_length"] = u32(d["moe_intermediate_size"])
    if d.get("final_logit_softcapping"):
        out[f"{a}.final_logit_softcapping"] = f32(d["final_logit_softcapping"])
    if d.get("use_double_wide_mlp"):
        first_shared = n - int(d.get("num_kv_shared_layers") or 0)
        ff = int(d["intermediate_size"])
        out[f"{a}.feed_forward_length"] = ["ARRAY", "UINT32", [ff if i < first_shared else 2 * ff for i in range(n)]]
    kv_full = _full_layer_override(d, "num_key_value_heads")
    if kv_full is not None:
        out[f"{a}.attention.head_count_kv"] = ["ARRAY", "UINT32", [int(d["num_key_value_heads"]) if s else int(kv_full) for s in swa]]
    return out


def rope_freqs(config) -> torch.Tensor:
    """The full layers' frequency factors: proportional RoPE rotates only the first
    int(head_dim x partial_rotary_factor / 2) of a head's pairs (at the whole head's frequencies)."""
    d = _raw(config)
    head_full = int(_full_layer_override(d, "head_dim"))
    n_rot = int(head_full * float(d["rope_parameters"][FULL]["partial_rotary_factor"]) / 2)
    return torch.tensor([1.0] * n_rot + [UNROTATED] * (head_full // 2 - n_rot), dtype=torch.float32)


# ----------------------------------------------------------------------------- the MTP drafter
# Gemma 4's multi-token-prediction drafter ("assistant"; transformers `gemma4_assistant`, llama.cpp
# arch `gemma4-assistant`): a small Gemma 4 decoder whose every layer attends to the target's K/V,
# fed with [target embedding of the last token x sqrt(H_target), target's last hidden state]
# through `pre_projection` (2 H_target -> H), handing its next hidden state back through
# `post_projection` (H -> H_target); its head is tied to its own embedding. The optional centroid
# head (`masked_embedding`: top clusters of the vocabulary) is dropped by llama.cpp's converter,
# and llama.cpp scores the whole vocabulary: drafts can differ from transformers' there (the
# target still verifies every one).
ASSISTANT_TYPES = ("gemma4_assistant",)
ASSISTANT_ARCH = "gemma4-assistant"
ASSISTANT_DROPPED = ("masked_embedding.",)  # HF tensors the GGUF does not hold


def check_assistant(config) -> None:
    check(config.get_text_config(), drafter=True)
    if not getattr(config, "backbone_hidden_size", None):
        raise QatkitError("gemma4 drafter: its config names no backbone_hidden_size (the target's hidden size)")


def assistant_hparams(config) -> dict:
    """The `gemma4-assistant.*` keys: its decoder's as for gemma4, the target's width it reads
    and writes (embedding_length_out), and its layer count as nextn_predict_layers."""
    text = config.get_text_config()
    out = hparams(text, ASSISTANT_ARCH, drafter=True)
    out[f"{ASSISTANT_ARCH}.embedding_length_out"] = ["UINT32", int(config.backbone_hidden_size)]
    out[f"{ASSISTANT_ARCH}.nextn_predict_layers"] = ["UINT32", int(text.num_hidden_layers)]
    return out

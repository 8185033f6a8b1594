"""Per-family tables: how a transformers model's tensors and config become llama.cpp's.

For each supported family: the GGUF architecture name, the tensor-name map (HF -> GGUF), what
the converter changes on the way (Gemma 3's RMSNorm stores 1 + w; Llama's q/k rows are reordered
for llama.cpp's rotary layout), the hyper-parameter keys llama.cpp reads, and for families with
more than a plain decoder (Gemma 4: per-layer embeddings, layer scalars, generated rope factors)
their own names, keys and checks (models/gemma4.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import QatkitError
from . import gemma4

_ATTN = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
}
_QK_NORM = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}


@dataclass(frozen=True)
class Arch:
    name: str  # general.architecture in GGUF
    model_types: tuple[str, ...]  # transformers config.model_type values
    layer_map: dict[str, str]  # module path inside a layer -> GGUF tensor stem
    norm_offset: float = 0.0  # added to every norm weight on export
    permute_qk: bool = False  # reorder q/k rows into llama.cpp's rotary layout
    extra_keys: tuple[str, ...] = field(default=())  # families' own hparams (see hparams())
    top_map: dict[str, str] = field(default_factory=dict)  # more whole-model tensors: HF name -> GGUF name
    layer_params: dict[str, str] = field(default_factory=dict)  # per-layer tensors without .weight/.bias (buffers, 3-D experts) -> GGUF suffix
    family_hparams: Callable | None = None  # config -> typed {key: [type, value]}: the family's whole key set
    generated: Callable | None = None  # config -> {GGUF name: tensor} the converter makes (no HF tensor)
    check: Callable | None = None  # config -> None, raising for a layout llama.cpp cannot run
    dropped: tuple[str, ...] = ()  # HF name prefixes the GGUF does not hold (said where it matters)


ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", ("llama",), {**_ATTN, "post_attention_layernorm": "ffn_norm"}, permute_qk=True),
    "qwen2": Arch("qwen2", ("qwen2",), {**_ATTN, "post_attention_layernorm": "ffn_norm"}),
    "qwen3": Arch("qwen3", ("qwen3",), {**_ATTN, **_QK_NORM, "post_attention_layernorm": "ffn_norm"}),
    "gemma3": Arch(
        "gemma3",
        ("gemma3_text",),
        {
            **_ATTN,
            **_QK_NORM,
            "post_attention_layernorm": "post_attention_norm",
            "pre_feedforward_layernorm": "ffn_norm",
            "post_feedforward_layernorm": "post_ffw_norm",
        },
        norm_offset=1.0,
        extra_keys=("sliding_window",),
    ),
    "gemma4": Arch(
        "gemma4",
        gemma4.TEXT_TYPES,
        {
            **_ATTN,
            **_QK_NORM,
            "post_attention_layernorm": "post_attention_norm",
            "pre_feedforward_layernorm": "ffn_norm",
            "post_feedforward_layernorm": "post_ffw_norm",
            "per_layer_input_gate": "inp_gate",
            "per_layer_projection": "proj",
            "post_per_layer_input_norm": "post_norm",
            "router.proj": "ffn_gate_inp",  # the MoE block (26B-A4B): router, experts and their norms
            "pre_feedforward_layernorm_2": "pre_ffw_norm_2",
            "post_feedforward_layernorm_1": "post_ffw_norm_1",
            "post_feedforward_layernorm_2": "post_ffw_norm_2",
        },
        top_map={
            "model.embed_tokens_per_layer.weight": "per_layer_token_embd.weight",
            "model.per_layer_model_projection.weight": "per_layer_model_proj.weight",
            "model.per_layer_projection_norm.weight": "per_layer_proj_norm.weight",
        },
        layer_params={
            "layer_scalar": "layer_output_scale.weight",
            "router.scale": "ffn_gate_inp.scale",
            "router.per_expert_scale": "ffn_down_exps.scale",
            "experts.gate_up_proj": "ffn_gate_up_exps.weight",  # 3-D (experts, 2 x ffn, hidden), kept fused
            "experts.down_proj": "ffn_down_exps.weight",  # 3-D (experts, hidden, ffn)
        },
        family_hparams=gemma4.hparams,
        generated=lambda config: {"rope_freqs.weight": gemma4.rope_freqs(config)},
        check=gemma4.check,
    ),
}

# the drafter: a Gemma 4 decoder without K/V of its own, and its two projections to the target
ARCHS[gemma4.ASSISTANT_ARCH] = Arch(
    gemma4.ASSISTANT_ARCH,
    gemma4.ASSISTANT_TYPES,
    ARCHS["gemma4"].layer_map,
    top_map={"pre_projection.weight": "nextn.pre_projection.weight", "post_projection.weight": "nextn.post_projection.weight"},
    layer_params={"layer_scalar": "layer_output_scale.weight"},
    family_hparams=gemma4.assistant_hparams,
    generated=lambda config: {"rope_freqs.weight": gemma4.rope_freqs(config.get_text_config())},
    check=gemma4.check_assistant,
    dropped=gemma4.ASSISTANT_DROPPED,
)

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_LAYER_PARAM = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def arch_for_config(config) -> Arch:
    """The table for a transformers config; raises for a family (or a layout of it) qatkit or
    llama.cpp cannot take."""
    for arch in ARCHS.values():
        if config.model_type in arch.model_types:
            if arch.check is not None:
                arch.check(config)
            return arch
    supported = ", ".join(sorted(t for a in ARCHS.values() for t in a.model_types))
    raise QatkitError(f"unsupported architecture {config.model_type!r} (supported: {supported})")


def arch_by_name(name: str) -> Arch:
    if name not in ARCHS:
        raise QatkitError(f"unsupported GGUF architecture {name!r} (supported: {', '.join(ARCHS)})")
    return ARCHS[name]


def gguf_name(arch: Arch, hf_name: str) -> str | None:
    """HF parameter name -> GGUF tensor name; None for tensors llama.cpp does not store
    (e.g. rotary buffers). Raises for a parameter the table does not know, so that no weight is
    silently dropped."""
    if hf_name.startswith(arch.dropped):  # (an empty tuple matches nothing)
        return None
    if hf_name in _TOP:
        return _TOP[hf_name]
    if hf_name in arch.top_map:
        return arch.top_map[hf_name]
    m = _LAYER.match(hf_name)
    if m and m.group(2) in arch.layer_map:
        return f"blk.{m.group(1)}.{arch.layer_map[m.group(2)]}.{m.group(3)}"
    m = _LAYER_PARAM.match(hf_name)
    if m and m.group(2) in arch.layer_params:
        return f"blk.{m.group(1)}.{arch.layer_params[m.group(2)]}"
    raise QatkitError(f"{arch.name}: no GGUF name for tensor {hf_name!r}; this model has parts qatkit does not know")


def generated_tensors(arch: Arch, config) -> dict[str, torch.Tensor]:
    """Tensors llama.cpp's converter writes that the HF model has none of (Gemma 4's rope_freqs)."""
    return arch.generated(config) if arch.generated is not None else {}


def _permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # HF stores each head's rotary pairs as two halves [x0..x(d/2-1), y0..]; llama.cpp's rope
    # (mode 0) rotates adjacent pairs, so interleave the halves per head: (h, 2, d/2) -> (h, d/2, 2).
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def to_gguf_tensor(arch: Arch, config, gguf: str, w: torch.Tensor) -> torch.Tensor:
    """Apply the converter's transform to one tensor (HF layout -> what llama.cpp expects)."""
    if arch.norm_offset and gguf.endswith("norm.weight"):
        return w + arch.norm_offset
    if arch.permute_qk and gguf.endswith(("attn_q.weight", "attn_q.bias")):
        return _permute_rotary(w, config.num_attention_heads)
    if arch.permute_qk and gguf.endswith(("attn_k.weight", "attn_k.bias")):
        return _permute_rotary(w, config.num_key_value_heads)
    return w


def from_gguf_tensor(arch: Arch, config, gguf: str, w: torch.Tensor) -> torch.Tensor:
    """Inverse of to_gguf_tensor (up to float rounding of the norm offset)."""
    if arch.norm_offset and gguf.endswith("norm.weight"):
        return w - arch.norm_offset
    if arch.permute_qk and gguf.endswith(("attn_q.weight", "attn_q.bias")):
        return _unpermute_rotary(w, config.num_attention_heads)
    if arch.permute_qk and gguf.endswith(("attn_k.weight", "attn_k.bias")):
        return _unpermute_rotary(w, config.num_key_value_heads)
    return w


def _rope(config, layer_type: str = "full_attention") -> dict:
    # transformers >= 5 keeps rope settings in config.rope_parameters (per layer type for Gemma 3);
    # older configs have rope_theta / rope_scaling attributes.
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params:
        params = params[layer_type]
    params = dict(params or {})
    if layer_type == "sliding_attention" and "rope_theta" not in params:
        # transformers < 5 Gemma 3: the local layers' base is its own attribute
        params.setdefault("rope_theta", getattr(config, "rope_local_base_freq", 10000.0))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if layer_type != "sliding_attention":
        scaling = getattr(config, "rope_scaling", None) or {}
        for k, v in scaling.items():
            params.setdefault(k, v)
    return params


def rope_base_and_factor(config, layer_type: str = "full_attention") -> tuple[float, float]:
    """(freq_base, linear scaling factor) of the rotary embedding of one layer type, as the
    exported file gives them to llama.cpp (its angle for pair i at position p is
    p * base^(-2i/n_dims) / factor). Raises for a scaling qatkit cannot write."""
    rope = _rope(config, layer_type)
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "linear":
        return float(rope["rope_theta"]), float(rope["factor"])
    if kind != "default":
        raise QatkitError(f"rope scaling {kind!r} is not supported yet (supported: default, linear)")
    return float(rope["rope_theta"]), 1.0


def hparams(arch: Arch, config) -> dict[str, int | float | str | list]:
    """The `{arch}.*` keys llama.cpp reads, from a transformers config: plain values (typed the
    converter's way on writing), or [type, value] entries where the family types its own."""
    if arch.family_hparams is not None:
        return arch.family_hparams(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    a = arch.name
    out: dict[str, int | float | str] = {
        f"{a}.context_length": int(config.max_position_embeddings),
        f"{a}.embedding_length": int(config.hidden_size),
        f"{a}.block_count": int(config.num_hidden_layers),
        f"{a}.feed_forward_length": int(config.intermediate_size),
        f"{a}.attention.head_count": int(config.num_attention_heads),
        f"{a}.attention.head_count_kv": int(config.num_key_value_heads),
        f"{a}.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        f"{a}.attention.key_length": int(head_dim),
        f"{a}.attention.value_length": int(head_dim),
        f"{a}.rope.dimension_count": int(head_dim),
    }
    try:
        base, factor = rope_base_and_factor(config)
    except QatkitError as e:
        raise QatkitError(f"{a}: {e}") from None
    out[f"{a}.rope.freq_base"] = base
    if factor != 1.0:
        out[f"{a}.rope.scaling.type"] = "linear"
        out[f"{a}.rope.scaling.factor"] = factor
    if "sliding_window" in arch.extra_keys and getattr(config, "sliding_window", None):
        out[f"{a}.attention.sliding_window"] = int(config.sliding_window)
        # llama.cpp's Gemma 3 rotates its sliding-window layers with `rope.freq_base_swa`
        # (10000 when the key is absent, src/models/gemma3.cpp load_arch_hparams) and no scaling
        # (rope_freq_scale_train_swa stays 1): write the config's own local base, so that a
        # config whose sliding layers use another base is not silently rotated with 10000.
        swa_base, swa_factor = rope_base_and_factor(config, "sliding_attention")
        if swa_factor != 1.0:
            raise QatkitError(f"{a}: llama.cpp cannot scale the sliding-window layers' rope (factor {swa_factor})")
        out[f"{a}.rope.freq_base_swa"] = swa_base
    return out

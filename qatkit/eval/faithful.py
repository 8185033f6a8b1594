"""Runtime-faithful forward: round activations where llama.cpp's CPU backend rounds them.

A float torch model is close to, not equal to, what llama.cpp computes from the same weights.
The CPU backend (ggml-cpu, flash attention off, f16 KV cache) rounds activations in four places,
read in the llama.cpp sources that llama-cpp-python 0.3.36 vendors:

1. Matrix products (`ggml_compute_forward_mul_mat`) convert the float input to the weight type's
   `vec_dot_type` first (`type_traits_cpu`): Q4_0 and Q8_0 -> Q8_0 blocks of 32 (x86 SIMD
   `quantize_row_q8_0`: 127/amax, round half to even; the Q4_0 repack path rounds the same way),
   Q6_K -> Q8_K blocks of 256 (`quantize_row_q8_K_ref`), F16 -> f16, F32 -> nothing.
2. K and V are stored in the f16 KV cache. The non-flash K*Q product (`build_attn_mha`) has an f16
   K, so Q is converted to f16 too; gemma3 scales Q before that, the other families pass the scale
   to `soft_max_ext` after it.
3. The softmax probabilities are converted to f16 for the product with the f16 V.
4. GELU (`ggml_vec_geglu_f32`, GGML_GELU_FP16 on by default) is an f16 table of the tanh
   approximation: fp16(gelu(fp16(x))) for -10 < x < 10, 0 below, x above.

The token embedding lookup (`get_rows`) dequantizes exactly, so it needs nothing here. Every
rounding passes the gradient straight through, so the mode can also be trained in.
"""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import q8_0
from ..formats._ste import straight_through

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "qatkit_llamacpp_faithful"
Q8_K_BLOCK = 256

# model_type -> whether llama.cpp multiplies Q by the attention scale *before* the f16 K*Q
# product (src/models/gemma3.cpp) rather than inside soft_max_ext (llama, qwen2, qwen3).
_Q_PRESCALED = {"gemma3_text": True, "llama": False, "qwen2": False, "qwen3": False}


def f16_round(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest f16 (ties to even, as F16C's `_cvtps_ph`), back in x's dtype."""
    return x.to(torch.float16).to(x.dtype)


def q8_k_activation_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """Activations as ggml's `quantize_row_q8_K_ref` (the x86 `quantize_row_q8_K`) rounds them
    before a Q6_K product: per 256, iscale = -127/max (max = the first value of largest |x|),
    q = min(127, round-half-even(iscale*x)), value = q * (1/iscale), all float32."""
    if x.shape[-1] % Q8_K_BLOCK:
        raise ValueError(f"Q8_K needs rows whose length is a multiple of {Q8_K_BLOCK}, got {tuple(x.shape)}")
    b = x.float().reshape(*x.shape[:-1], x.shape[-1] // Q8_K_BLOCK, Q8_K_BLOCK)
    mx = b.gather(-1, b.abs().argmax(dim=-1, keepdim=True))  # argmax returns the first maximum
    zero = mx == 0
    # Trap: torch computes `scalar / tensor` as reciprocal times scalar, two roundings; C's
    # -127.f/max is one. Divide tensor by tensor.
    iscale = torch.where(zero, torch.zeros_like(mx), torch.full_like(mx, -127.0) / mx)
    q = torch.round(iscale * b).clamp(max=127.0)  # nearest_int's magic-number add rounds half to even
    d = torch.where(zero, torch.zeros_like(mx), torch.ones_like(mx) / iscale)
    return (q * d).reshape(x.shape).to(x.dtype)


# ggml type of a weight -> how the matrix product rounds the activation it is multiplied with.
ACTIVATION_ROUNDING: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "q4_0": q8_0.activation_fake_quant,
    "q8_0": q8_0.activation_fake_quant,
    "q6_k": q8_k_activation_fake_quant,
    "f16": f16_round,
    "f32": None,
}
_ROW_MULTIPLE = {"q4_0": q8_0.BLOCK, "q8_0": q8_0.BLOCK, "q6_k": Q8_K_BLOCK}


def _faithful(x: torch.Tensor, rounding: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        rounded = rounding(x)
    return straight_through(x, rounded)


# --- GELU: ggml's f16 lookup table ---------------------------------------------------------------

@functools.cache
def _gelu_table(device: torch.device) -> torch.Tensor:
    """fp16(ggml_gelu_f32(x)) for every f16 bit pattern x, as float32, indexed by the 16 bits."""
    x = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    # ggml_gelu_f32, evaluated in float32 in C's order:
    # 0.5f*x*(1.0f + tanhf(SQRT_2_OVER_PI*x*(1.0f + GELU_COEF_A*x*x)))
    # Trap: gcc (-std=gnu11 implies -ffp-contract=fast) fuses `1.0f + (A*x)*x` into one fma, and
    # that changes table entries (x = -1.999 is one). Emulate the fma in float64, where the
    # float32 product (A*x)*x is exact, then round once to float32.
    a = torch.tensor(0.044715, dtype=torch.float32)
    s = torch.tensor(0.79788456080286535587989211986876, dtype=torch.float32)
    fused = ((a * x).double() * x.double() + 1.0).float()
    inner = (s * x) * fused
    # tanh in float64 rounded once to float32: a correctly rounded tanhf (glibc's is within an ulp)
    t = torch.tanh(inner.double()).float()
    y = (0.5 * x) * (1.0 + t)
    return y.to(torch.float16).float().to(device)


def gelu_table(x: torch.Tensor) -> torch.Tensor:
    """ggml's CPU GELU (`ggml_vec_gelu_f32` / `ggml_vec_geglu_f32` with GGML_GELU_FP16)."""
    xf = x.float()
    idx = xf.to(torch.float16).view(torch.int16).long() & 0xFFFF
    y = _gelu_table(xf.device)[idx]
    y = torch.where(xf >= 10.0, xf, y)
    y = torch.where(xf <= -10.0, torch.zeros_like(xf), y)
    return y.to(x.dtype)


class TableGELU(nn.Module):
    """Forward: ggml's table GELU; backward: the tanh-approximation GELU's gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            y = gelu_table(x)
        return straight_through(F.gelu(x, approximate="tanh"), y)


# --- attention --------------------------------------------------------------------------------

def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    # (batch, kv_heads, seq, dim) -> (batch, kv_heads * groups, seq, dim), as ggml_mul_mat broadcasts
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def faithful_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention with llama.cpp's f16 roundings of q, k, v and the softmax.

    Shapes: query (batch, heads, q_len, dim); key, value (batch, kv_heads, kv_len, dim)."""
    if scaling is None:
        scaling = module.head_dim**-0.5
    if _Q_PRESCALED[module.config.model_type]:
        q, post_scale = _faithful(query * scaling, f16_round), 1.0
    else:
        q, post_scale = _faithful(query, f16_round), scaling
    groups = module.num_key_value_groups
    k = _repeat_kv(_faithful(key, f16_round), groups)
    v = _repeat_kv(_faithful(value, f16_round), groups)

    weights = torch.matmul(q, k.transpose(2, 3)) * post_scale
    if softcap is not None:  # eager's order (after the scale); none of the four families caps
        weights = torch.tanh(weights / softcap) * softcap
    if attention_mask is not None:
        weights = weights + attention_mask
    probs = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = _faithful(probs, f16_round)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, v).transpose(1, 2).contiguous()
    return out, probs


@functools.cache
def _register_attention() -> None:
    # The mask interface must know the name too: for an unknown name transformers builds no mask.
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, faithful_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)


# --- the context ----------------------------------------------------------------------------

def _check(model: nn.Module, weight_types: dict[str, str]) -> dict[str, nn.Linear]:
    modules = dict(model.named_modules())
    linears = {}
    for name, wtype in weight_types.items():
        if wtype not in ACTIVATION_ROUNDING:
            raise ValueError(f"weight type {wtype!r} of {name!r} is not one of {sorted(ACTIVATION_ROUNDING)}")
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name!r} is not an nn.Linear of the model (got {type(module).__name__})")
        multiple = _ROW_MULTIPLE.get(wtype, 1)
        if module.in_features % multiple:
            raise ValueError(
                f"{name!r} has {module.in_features} input features; {wtype} needs a multiple of {multiple}"
            )
        linears[name] = module
    missing = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n not in weight_types]
    if missing:
        log.warning("%d linear modules have no weight type and stay unrounded, e.g. %s",
                    len(missing), missing[0])
    return linears


def _check_gemma3_scale(config) -> None:
    # llama.cpp does not read Gemma 3's attention scale from the file (gemma3.cpp
    # load_arch_hparams): 1/sqrt(hidden/heads) for the 62-layer 27B, 1/sqrt(head_dim) otherwise.
    # The faithful mode keeps transformers' scale; say when the two differ.
    heads = config.num_attention_heads
    scalar = config.hidden_size // heads if config.num_hidden_layers == 62 else config.head_dim
    if config.query_pre_attn_scalar != scalar:
        log.warning("query_pre_attn_scalar is %s, but llama.cpp scales Q by 1/sqrt(%s)",
                    config.query_pre_attn_scalar, scalar)


def _input_hook(rounding: Callable[[torch.Tensor], torch.Tensor]):
    def hook(module, args, kwargs):
        if args:
            return (_faithful(args[0], rounding), *args[1:]), kwargs
        return args, {**kwargs, "input": _faithful(kwargs["input"], rounding)}

    return hook


@contextmanager
def llamacpp_faithful(model: nn.Module, weight_types: dict[str, str]):
    """weight_types maps a module name of `model` (e.g. 'model.layers.0.self_attn.q_proj',
    'lm_head') to the ggml type its weight has in the GGUF file: 'q4_0' | 'q8_0' | 'q6_k' | 'f16' |
    'f32'. Inside the context, the model's forward rounds activations as llama.cpp's CPU backend
    does. The weights themselves are not touched: quantize them separately."""
    config = model.config.get_text_config()
    family = config.model_type
    if family not in _Q_PRESCALED:
        raise ValueError(f"model type {family!r} is not one of {sorted(_Q_PRESCALED)}")
    if family == "gemma3_text":
        _check_gemma3_scale(config)
    linears = _check(model, weight_types)
    _register_attention()

    original_attn = model.config._attn_implementation
    handles = []
    swapped = []  # (mlp module, original activation)
    try:
        for name, module in linears.items():
            rounding = ACTIVATION_ROUNDING[weight_types[name]]
            if rounding is not None:
                handles.append(module.register_forward_pre_hook(_input_hook(rounding), with_kwargs=True))
        if family == "gemma3_text":
            # llama.cpp's gemma3 graph always uses GELU (LLM_FFN_GELU), whatever the HF config says
            for module in model.modules():
                if type(module).__name__.endswith("MLP") and hasattr(module, "act_fn"):
                    swapped.append((module, module.act_fn))
                    module.act_fn = TableGELU()
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            # transformers only logs a warning for models that cannot switch
            raise ValueError(f"{type(model).__name__} cannot switch its attention implementation")
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for module, act in swapped:
            module.act_fn = act
        model.set_attn_implementation(original_attn)

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

Those roundings turn an ulp of difference upstream into a whole f16 or Q8_0 step now and then,
so the float arithmetic around them is ggml's too (each section below says where it is read):

5. RMSNorm sums the squares in double and takes a correctly rounded sqrtf.
6. RoPE angles are a running float32 product per pair with the C library's cosf/sinf, and the
   rotation is fma-contracted; transformers' p * inv_freq parts from it with the position.
7. The attention scale is the float32 1.0f/sqrtf(head_dim).
8. With `exact=True` (the default): every matrix product before the head sums in the order of
   the kernel the x86 build picks (tinyBLAS lanes, the repacked Q4_0 block order), and softmax
   and SwiGLU come from ggml's own row kernels (its vectorised exp). With `exact_head=True` too,
   llama.cpp's logits and these are equal bit for bit (tiny models of the four families; F32,
   F16, Q8_0, Q4_0 files; Gemma 3 270M Q4_0 over 512 tokens); without, to a few ulps.

The token embedding lookup (`get_rows`) dequantizes exactly, so it needs nothing here. Every
rounding passes the gradient straight through, so the mode can also be trained in.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from ...models.arch import arch_for_config
from ...models.gemma4 import EXPERT_WEIGHTS
from . import moe
from .lanes import _EXACT, GgmlCpu, _linear_exact, ggml_cpu_build, q0_matmul, tinyblas_matmul
from .ops import (
    _Q_PRESCALED,
    _ROW_MULTIPLE,
    ACTIVATION_ROUNDING,
    ATTN_IMPLEMENTATION,
    GELU_FAMILIES,
    Q8_K_BLOCK,
    TableGELU,
    _faithful,
    _register_attention,
    _rms_norm_hook,
    _rotary_hook,
    _swiglu_hooks,
    f16_round,
    faithful_attention,
    gelu_table,
    ggml_apply_rotary_for,
    ggml_rms_norm,
    ggml_rope_cos_sin,
    ggml_rotate,
    ggml_softmax,
    ggml_swiglu,
    q8_k_activation_fake_quant,
)

__all__ = [  # the mode's public surface; ops.py and lanes.py hold the pieces
    "llamacpp_faithful", "ACTIVATION_ROUNDING", "ATTN_IMPLEMENTATION", "Q8_K_BLOCK", "GgmlCpu", "ggml_cpu_build", "f16_round",
    "q8_k_activation_fake_quant", "gelu_table", "TableGELU", "ggml_rms_norm", "ggml_rope_cos_sin", "ggml_rotate", "ggml_softmax",
    "ggml_swiglu", "faithful_attention", "tinyblas_matmul", "q0_matmul",
]

log = logging.getLogger(__name__)

# --- the context ----------------------------------------------------------------------------

def _check(model: nn.Module, weight_types: dict[str, str]) -> dict[str, nn.Linear]:
    modules = dict(model.named_modules())
    linears = {}
    for name, wtype in weight_types.items():
        if wtype not in ACTIVATION_ROUNDING:
            raise ValueError(f"weight type {wtype!r} of {name!r} is not one of {sorted(ACTIVATION_ROUNDING)}")
        module = modules.get(name)
        if module is None and name.rsplit(".", 1)[-1] in EXPERT_WEIGHTS:
            continue  # a 3-D expert weight (a Parameter, not a module): moe.py rounds for it
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
def llamacpp_faithful(model: nn.Module, weight_types: dict[str, str], exact: bool = True,
                      exact_head: bool = False):
    """weight_types maps a module name of `model` (e.g. 'model.layers.0.self_attn.q_proj',
    'lm_head') to the ggml type its weight has in the GGUF file: 'q4_0' | 'q8_0' | 'q6_k' | 'f16' |
    'f32'. Inside the context, the model's forward rounds activations as llama.cpp's CPU backend
    does. The weights themselves are not touched: quantize them separately.

    exact: also sum the matrix products in the order of the loaded llama.cpp build's kernels
    (where ggml_cpu_build() recognises it; in float64 on the model's device) and take softmax and
    SwiGLU from ggml's own row kernels (on the CPU, through ctypes): several times the cost of the
    plain forward, for bit-level agreement. Off, products keep torch's order and exp is torch's:
    an ulp here and there, so now and then an f16 or Q8_0 rounding after one lands on the other
    side (a training forward needs no more).

    exact_head: the output head's product in llama.cpp's order too. Off (the default), it keeps
    torch's: nothing is rounded after it, so the logits differ from llama.cpp's by a few ulps
    (Gemma 3 270M, Q8_0 head, 512 tokens: max |dlogit| 3e-5, KLD 2e-12), while emulating the
    lanes of its 262k-row head costs ~7 minutes per 512 tokens on 2 CPU cores."""
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
    patched = []  # (modeling module, its own apply_rotary_pos_emb)
    overridden = []  # (module, attribute, its instance value before or None): put back on exit
    token = None
    try:
        build = ggml_cpu_build() if exact else None
        head = model.get_output_embeddings()
        for name, module in linears.items():
            rounding = ACTIVATION_ROUNDING[weight_types[name]]
            if rounding is not None:
                handles.append(module.register_forward_pre_hook(_input_hook(rounding), with_kwargs=True))
            skip = build is None or (module is head and not exact_head)
            product = None if skip else _linear_exact(weight_types[name], build)
            if product is not None:
                handles.append(module.register_forward_hook(product))
        if exact:
            for module in model.modules():
                if type(module).__name__.endswith("MLP") and family not in GELU_FAMILIES:
                    handles.extend(_swiglu_hooks(module))  # after the Linear hooks: sees their outputs
        token = _EXACT.set((build,) if exact else None)
        rotary = [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("RotaryEmbedding")]
        attn_modules = {sys.modules[type(m).__module__] for m in model.modules()
                        if type(m).__name__.endswith("Attention")}
        if not rotary or not attn_modules or not all(hasattr(mod, "apply_rotary_pos_emb") for mod in attn_modules):
            raise ValueError(f"{type(model).__name__}: cannot find its rotary embedding to make it ggml's")
        offset = arch_for_config(model.config).norm_offset  # (a drafter: its own arch, not its decoder's)
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                handles.append(module.register_forward_hook(_rms_norm_hook(config.rms_norm_eps, offset)))
        for name, module in rotary:
            handles.append(module.register_forward_hook(_rotary_hook(config, name), with_kwargs=True))
        for mod in attn_modules:  # the attention forward calls the modeling file's global
            patched.append((mod, mod.apply_rotary_pos_emb))
            mod.apply_rotary_pos_emb = ggml_apply_rotary_for(mod.apply_rotary_pos_emb)
        if family in GELU_FAMILIES:
            # llama.cpp's gemma3/gemma4 graphs always use GELU (LLM_FFN_GELU), whatever the HF config
            # says, and so does Gemma 4's per-layer-input gate (the decoder layer's own act_fn)
            for module in model.modules():
                gelu_user = type(module).__name__.endswith("MLP") or hasattr(module, "per_layer_input_gate")
                if gelu_user and hasattr(module, "act_fn"):
                    swapped.append((module, module.act_fn))
                    module.act_fn = TableGELU()
        if not model.training:  # the MoE block in llama.cpp's order (measurement only)
            names = {m: n for n, m in model.named_modules()}
            for layer in moe.moe_layers(model):
                overridden.extend(moe.install(layer, names[layer], weight_types, config.rms_norm_eps))
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            # transformers only logs a warning for models that cannot switch
            raise ValueError(f"{type(model).__name__} cannot switch its attention implementation")
        yield model
    finally:
        if token is not None:
            _EXACT.reset(token)
        for handle in handles:
            handle.remove()
        for module, act in swapped:
            module.act_fn = act
        for mod, fn in patched:
            mod.apply_rotary_pos_emb = fn
        for module, attr, before in reversed(overridden):
            if before is None:
                delattr(module, attr)
            else:
                setattr(module, attr, before)
        model.set_attn_implementation(original_attn)

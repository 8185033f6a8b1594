"""The operations llama.cpp's CPU backend rounds, as it rounds them: activation roundings in front
of each matrix product, ggml's GELU table, RMSNorm, RoPE, its softmax and SwiGLU row kernels, and
the attention forward registered for the faithful mode. The package docstring
(`qatkit/runtime/faithful/__init__.py`) says where each was read in llama.cpp."""

from __future__ import annotations

import functools
import logging
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...formats import FORMATS, q6_k
from ...formats._ste import straight_through
from ...models import gemma4
from ...models.arch import arch_for_config, rope_base_and_factor
from ..ggml import libm, row_kernels
from .lanes import _EXACT, _matmul

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "qatkit_llamacpp_faithful"
Q8_K_BLOCK = q6_k.ACT_BLOCK

# model_type -> whether llama.cpp multiplies Q by the attention scale *before* the f16 K*Q
# product (src/models/gemma3.cpp) rather than inside soft_max_ext (llama, qwen2, qwen3).
_Q_PRESCALED = {"gemma3_text": True, "gemma4_text": False, "gemma4_unified_text": False, "llama": False, "qwen2": False, "qwen3": False}
# families whose feed-forward llama.cpp computes with GELU (ggml's f16 table) rather than SwiGLU
GELU_FAMILIES = ("gemma3_text", *gemma4.TEXT_TYPES)


f16_round = FORMATS["f16"].activation_rounding  # round to the nearest f16, back in x's dtype
q8_k_activation_fake_quant = q6_k.activation_fake_quant  # what a Q6_K product does to its input

# ggml type of a weight -> how the matrix product rounds the activation it is multiplied with
# (the format registry's own rounding; None where it rounds nothing), and the row multiple it needs.
ACTIVATION_ROUNDING: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    name: (f.activation_rounding if f.rounds_activations else None) for name, f in FORMATS.items()}
_ROW_MULTIPLE = {name: f.act_block for name, f in FORMATS.items() if f.act_block > 1}


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


# --- RMSNorm: ggml's sum of squares ------------------------------------------------------------

def ggml_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """ggml_compute_forward_rms_norm_f32 then the weight product (ggml_mul, or the fused
    rms_norm+mul, same roundings): the squares are float32 and summed in double (`ggml_float`),
    mean = (float)(sum/n), scale = 1.0f/sqrtf(mean + eps), y = (x*scale)*w.

    transformers sums the squares in float32, so its mean, and with it a whole row, is an ulp off
    for ~10% of rows; enough to move a Q8_0 block scale (fp16(amax/127)) or an f16 q/k now and then.
    The double sum here is pairwise, not sequential: both are within ~1e-16 of the exact sum, so the
    float32 mean differs only when that sum lies within ~1e-16 of a float32 rounding boundary.
    A norm without a weight (Gemma 4's V norm) stops at x*scale."""
    xf = x.float()
    mean = ((xf * xf).double().sum(-1, keepdim=True) / x.shape[-1]).float()
    # Trap: torch's float32 sqrt on CPU is not correctly rounded (an ulp or two off, e.g. at
    # 3.6889088e-4); sqrtf is. The float64 root of a float32, rounded to float32, is.
    root = torch.sqrt((mean + np.float32(eps)).double()).float()
    scale = torch.ones_like(root) / root  # tensor / tensor: one rounding, as 1.0f/sqrtf(...)
    y = xf * scale
    return (y if weight is None else y * weight.float()).to(x.dtype)


def _rms_norm_hook(eps: float, offset: float):
    """Forward hook of an RMSNorm module: its output replaced by ggml's (the norm weight as the
    exported file holds it: w + offset in float32, Gemma's 1 + w); the gradient stays transformers'."""

    def hook(module, args, output):
        w = getattr(module, "weight", None)
        if w is not None and offset:
            w = w.float() + offset
        with torch.no_grad():
            exact = ggml_rms_norm(args[0], w, eps)
        return straight_through(output, exact.to(output.dtype))

    return hook


# --- RoPE: ggml's angles and rotation ----------------------------------------------------------
#
# transformers and ggml rotate the same pairs by nominally the same angles, but round differently,
# and the difference grows with the position (ggml-cpu ops.cpp, ggml_compute_forward_rope_flt):
# - the angle of pair i is a running float32 product, theta_0 = p, theta_i = theta_{i-1} *
#   theta_scale with theta_scale = powf(freq_base, -2.0f/n_dims) (ggml_rope_cache_init), then
#   freq_scale * theta (rope_yarn); transformers takes p * inv_freq[i], inv_freq = 1/base**(2i/d).
#   At p ~ 100 the angles differ by ~1e-6 rad, enough to flip f16 roundings of q and k;
# - cos/sin are the C library's cosf/sinf (glibc's are not correctly rounded: ~1% of the table
#   differs from float64 rounded to float32 by an ulp);
# - rotate_pairs computes x0*cos - x1*sin and x0*sin + x1*cos, which gcc (-ffp-contract=fast, FMA
#   in the native x86 build) contracts to fma(x0, cos, -(x1*sin)) and fma(x0, sin, x1*cos);
#   transformers' q*cos + rotate_half(q)*sin rounds each product, ~25% of outputs differ by an ulp.
# ggml's NEOX mode (gemma3, qwen2, qwen3) pairs (i, i + d/2) as transformers' rotate_half does;
# llama's NORMAL mode pairs (2i, 2i+1) of the rows the exporter permuted, the same pairs again.

_ROPE_TABLE_MIN = 256


@functools.lru_cache(maxsize=16)
def _rope_table(n_pos: int, n_dims: int, freq_base: float, freq_scale: float, freq_factors: tuple[float, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (n_pos, n_dims/2) float32 as ggml_rope_cache_init computes them for positions
    0..n_pos-1 (freq_base and freq_scale are float32 values, as llama.cpp holds them); with
    `freq_factors` (a rope_freqs tensor) pair i's angle is divided by factor i first."""
    cmath = libm()
    exponent = np.float32(-2.0) / np.float32(n_dims)
    if cmath is not None:
        theta_scale = np.float32(cmath["powf"](freq_base, float(exponent)))
    else:
        theta_scale = np.float32(np.float64(freq_base) ** np.float64(exponent))
    theta = np.empty((n_pos, n_dims // 2), dtype=np.float32)
    t = np.arange(n_pos, dtype=np.float32)
    for i in range(n_dims // 2):
        theta[:, i] = t if freq_factors is None else t / np.float32(freq_factors[i])  # rope_yarn(theta/ff, ...)
        t = t * theta_scale  # float32 * float32 scalar: one float32 rounding, as `theta *= theta_scale`
    theta = theta * np.float32(freq_scale)  # rope_yarn: theta_interp = freq_scale * theta_extrap
    if cmath is not None:
        flat = theta.ravel().tolist()
        cos = np.fromiter(map(cmath["cosf"], flat), dtype=np.float32, count=len(flat)).reshape(theta.shape)
        sin = np.fromiter(map(cmath["sinf"], flat), dtype=np.float32, count=len(flat)).reshape(theta.shape)
    else:
        cos = np.cos(theta.astype(np.float64)).astype(np.float32)
        sin = np.sin(theta.astype(np.float64)).astype(np.float32)
    return cos, sin


def ggml_rope_cos_sin(position_ids: torch.Tensor, n_dims: int, freq_base: float, freq_scale: float = 1.0, freq_factors: tuple[float, ...] | None = None):
    """ggml's cos/sin for `position_ids` in transformers' layout: (..., n_dims), both halves equal."""
    if position_ids.numel() and int(position_ids.min()) < 0:
        raise ValueError("negative positions")
    n = int(position_ids.max()) + 1 if position_ids.numel() else 1
    n_pos = max(_ROPE_TABLE_MIN, 1 << (n - 1).bit_length())  # tables grow by powers of two
    cos, sin = _rope_table(n_pos, n_dims, float(np.float32(freq_base)), float(np.float32(freq_scale)), freq_factors)
    idx = position_ids.detach().long().cpu()
    cos, sin = torch.from_numpy(cos)[idx], torch.from_numpy(sin)[idx]
    return (torch.cat((cos, cos), -1).to(position_ids.device), torch.cat((sin, sin), -1).to(position_ids.device))


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 fma(a, b, c): the product is exact in float64, the sum is rounded to float64 and
    then to float32 (a double rounding that differs from one rounding with probability ~2^-29)."""
    return (a.double() * b.double() + c.double()).to(a.dtype)


def ggml_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """ggml's rotate_pairs on transformers' half-split layout (x (..., d), cos/sin broadcastable
    to it); the gradient is that of transformers' x*cos + rotate_half(x)*sin."""
    h = x.shape[-1] // 2
    x0, x1 = x[..., :h], x[..., h:]
    c, s = cos[..., :h], sin[..., :h]
    plain = torch.cat((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1)
    with torch.no_grad():
        exact = torch.cat((_fma(x0, c, -(x1 * s)), _fma(x0, s, x1 * c)), dim=-1)
    return straight_through(plain, exact)


def _ggml_apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """Stands in for a modeling file's apply_rotary_pos_emb(q, k, cos, sin) inside the context."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return ggml_rotate(q, cos, sin), ggml_rotate(k, cos, sin)


def _ggml_apply_rotary_one(x, cos, sin, unsqueeze_dim=1):
    """Stands in for Gemma 4's apply_rotary_pos_emb(x, cos, sin), which rotates one tensor."""
    return ggml_rotate(x, cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim))


def ggml_apply_rotary_for(original):
    """The stand-in of the same signature as a modeling file's apply_rotary_pos_emb."""
    import inspect

    first = next(iter(inspect.signature(original).parameters))
    return _ggml_apply_rotary_one if first == "x" else _ggml_apply_rotary_pos_emb


def _rotary_hook(config, module_name: str):
    """Forward hook of a RotaryEmbedding module: its (cos, sin) replaced by ggml's."""
    gemma4_family = config.model_type in gemma4.TEXT_TYPES
    full_factors = tuple(gemma4.rope_freqs(config).tolist()) if gemma4_family else None  # llama.cpp's rope_freqs

    def hook(module, args, kwargs, output):
        position_ids = args[1] if len(args) > 1 else kwargs["position_ids"]
        layer_type = args[2] if len(args) > 2 else kwargs.get("layer_type")
        if layer_type is None:
            # transformers < 5 Gemma 3 has a second module for its sliding-window layers
            layer_type = "sliding_attention" if module_name.endswith("_local") else "full_attention"
        factors = None
        if gemma4_family:  # proportional RoPE on full layers, through the rope_freqs factors
            base, factor = float(config.rope_parameters[layer_type]["rope_theta"]), 1.0
            factors = full_factors if layer_type == gemma4.FULL else None
        else:
            base, factor = rope_base_and_factor(config, layer_type)
        cos, sin = output
        # llama.cpp: freq_scale = 1.0f/ropescale, in float32
        scale = float(np.float32(1.0) / np.float32(factor))
        gcos, gsin = ggml_rope_cos_sin(position_ids, cos.shape[-1], base, scale, factors)
        return gcos.to(cos.dtype), gsin.to(sin.dtype)

    return hook



# --- softmax and SiLU: ggml's own row kernels ----------------------------------------------------
#
# Softmax and SiLU go through ggml_v_expf, a vectorised exp polynomial (vec.h; AVX512, AVX2, NEON...
# variants) with elements past the last full vector done by the C library's expf: an ulp or so
# from torch's exp, which flips an f16 probability now and then. Rather than transcribe it, use
# it: libggml-cpu exports the row kernels ggml_vec_soft_max_f32 (y = exp(x - max), returns the
# sum in double) and ggml_vec_swiglu_f32 (y = silu(x) * g), the ones the softmax and SwiGLU ops
# call per row (ops.cpp). The rest of the softmax is done here in ggml's order
# (ggml_compute_forward_soft_max_f32): scale, add the mask, max, the kernel, then y *= (float)(1/sum).

_SOFTMAX_PAD = 16  # llama.cpp's KV length is a multiple of 256: every real key is in a full vector


def ggml_softmax(w: torch.Tensor) -> torch.Tensor | None:
    """softmax over the last dim of scaled, masked scores w, as ggml computes it; None without
    the library."""
    kernels = row_kernels()
    if kernels is None:
        return None
    n = w.shape[-1]
    rows = w.detach().float().reshape(-1, n).cpu().numpy()
    pad = -n % _SOFTMAX_PAD
    x = np.ascontiguousarray(np.pad(rows, ((0, 0), (0, pad)), constant_values=-np.inf), dtype=np.float32)
    y = np.zeros_like(x)
    mx = x.max(axis=1)
    stride = x.shape[1] * 4
    for r in range(x.shape[0]):
        if not np.isfinite(mx[r]):
            y[r, :] = np.nan  # a fully masked row: ggml asserts; let it show
            continue
        total = kernels["softmax"](x.shape[1], y.ctypes.data + r * stride, x.ctypes.data + r * stride, float(mx[r]))
        y[r] *= np.float32(1.0 / total)  # ggml_vec_scale_f32(ne00, dp, (float)(1.0/sum))
    return torch.from_numpy(y[:, :n]).reshape(w.shape).to(w.device)


def ggml_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up as ggml_vec_swiglu_f32 computes it, row by row; None without the library."""
    kernels = row_kernels()
    if kernels is None:
        return None
    n = gate.shape[-1]
    g = np.ascontiguousarray(gate.detach().float().reshape(-1, n).cpu().numpy())
    u = np.ascontiguousarray(up.detach().float().reshape(-1, n).cpu().numpy())
    y = np.empty_like(g)
    if n % _SOFTMAX_PAD == 0:  # elementwise, and no row has a tail: one call does every row
        kernels["swiglu"](g.size, y.ctypes.data, g.ctypes.data, u.ctypes.data)
    else:
        for r in range(g.shape[0]):
            off = r * n * 4
            kernels["swiglu"](n, y.ctypes.data + off, g.ctypes.data + off, u.ctypes.data + off)
    return torch.from_numpy(y).reshape(gate.shape).to(gate.device)


def _swiglu_hooks(mlp: nn.Module) -> list:
    """Hooks on a SwiGLU MLP (down_proj(act_fn(gate_proj(x)) * up_proj(x))) that make down_proj's
    input ggml's swiglu of the gate and up outputs (before down_proj's own input rounding)."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            seen[name] = output
        return hook

    def replace(module, args):
        if "gate" not in seen or "up" not in seen:
            return None
        exact = ggml_swiglu(seen.pop("gate"), seen.pop("up"))
        if exact is None:
            return None
        return (straight_through(args[0], exact.to(args[0].dtype)), *args[1:])

    return [mlp.gate_proj.register_forward_hook(keep("gate")), mlp.up_proj.register_forward_hook(keep("up")),
            mlp.down_proj.register_forward_pre_hook(replace, prepend=True)]


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
    scaling = _scale_f32(scaling)
    if _Q_PRESCALED[module.config.model_type]:
        q, post_scale = _faithful(query * scaling, f16_round), 1.0
    else:
        q, post_scale = _faithful(query, f16_round), scaling
    groups = module.num_key_value_groups
    k = _repeat_kv(_faithful(key, f16_round), groups)
    v = _repeat_kv(_faithful(value, f16_round), groups)

    if arch_for_config(module.config).permute_qk:
        # The exporter interleaved llama's q/k rows for ggml's NORMAL rope: K*Q sums each head's
        # elements in that order, which the lanes of the exact product see.
        weights = _matmul(_interleave_halves(q), _interleave_halves(k)) * post_scale
    else:
        weights = _matmul(q, k) * post_scale
    if softcap is not None:  # eager's order (after the scale); none of the four families caps
        weights = torch.tanh(weights / softcap) * softcap
    if attention_mask is not None:
        weights = weights + attention_mask
    probs = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    if _EXACT.get() is not None:
        exact = ggml_softmax(weights)
        if exact is not None:
            probs = straight_through(probs, exact.to(probs.dtype))
    probs = _faithful(probs, f16_round)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = _matmul(probs, v.transpose(2, 3)).transpose(1, 2).contiguous()
    return out, probs


def _interleave_halves(x: torch.Tensor) -> torch.Tensor:
    """(..., d) [x0..x(d/2-1), y0..] -> [x0, y0, x1, y1, ...]: a head as the permuted weights give it."""
    return x.unflatten(-1, (2, x.shape[-1] // 2)).transpose(-1, -2).flatten(-2)


def _scale_f32(scaling: float) -> float:
    """llama.cpp's attention scale is the float32 1.0f/sqrtf(float(d)) (qwen2.cpp, qwen3.cpp,
    llama.cpp, gemma3.cpp), not float64 d**-0.5 rounded (an ulp apart for d = 96, 112, ...)."""
    d = round(scaling**-2)
    if d > 0 and abs(d * scaling * scaling - 1.0) < 1e-6:
        return float(np.float32(1.0) / np.sqrt(np.float32(d)))
    return float(np.float32(scaling))


@functools.cache
def _register_attention() -> None:
    # The mask interface must know the name too: for an unknown name transformers builds no mask.
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, faithful_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)


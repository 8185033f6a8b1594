"""ggml Q4_0: blocks of 32 weights along a row, one fp16 scale each, 4-bit codes.

The one definition of Q4_0 in qatkit. Fake-quant (training), convert and export all call
`quantize`, so the numbers a GGUF file holds are the numbers the student trained with.

Reference: ggml `quantize_row_q4_0_ref` (ggml-quants.c), which `gguf.quants.Q4_0` reproduces
except for the sign of d in a block of -0.0 (tested against both; ggml is the truth):

    max = the element of the block with the largest |x|, sign kept (first one on ties)
    d   = max / -8                       (float32)
    id  = 1/d, or 0 where d == 0         (float32, from the float32 d, not the fp16 one)
    q   = min(15, trunc(x * id + 8.5))   (codes 0..15; the element `max` gets code 0)
    stored: fp16(d), value = (q - 8) * fp16(d)

Traps:
- `x * id + 8.5` must be two float32 roundings (multiply, then add). A fused multiply-add
  gives different codes on ties. torch's eager CPU/CUDA elementwise kernels do not fuse.
- Codes come from the float32 d but values use fp16(d): a block is not exactly
  `round(x / fp16(d))`.
- Learned scales: Q4_0 stores any fp16 d, so `quantize(w, d=...)` takes given scales. Then the
  codes are computed from the fp16 scale actually stored (so dequantize(quantize(w, d)) is what
  llama.cpp computes) and clamped to 0..15, since w may fall outside [-8d, 7d].
- Re-quantization: llama.cpp's quantizer, given a block's dequantized values (an unquantized
  checkpoint of the trained model), recovers d as (largest |value|) / -8: the same d exactly when
  some element of the block has code 0 (value -8d, the block's largest), and a different d, hence
  different codes, otherwise. ggml's own scale always puts the block's extreme on code 0; a
  learned d may not (it grew past the extreme, or the weights shrank under it). So a given d that
  leaves its block without a code 0 is cut to the largest d that puts the block's extreme element
  on d's side (sign(x) = -sign(d)) on code 0, |d| = |x| / 7.5 * (1 - 2^-9) (the margin keeps
  trunc(x/d + 8.5) at 0 after fp16 rounding); a block with no element on that side (all zero
  included: ggml writes d = -0.0) takes ggml's own scale. `quantize` applies this wherever d is
  given, so training, conversion and export all see the cut scale (`requantizable`).

Byte layout of one 18-byte block: fp16 d (little endian), then 16 bytes where byte j holds
element j in its low nibble and element j + 16 in its high nibble.
"""

from __future__ import annotations

import numpy as np
import torch

from . import _cpu
from ._ste import straight_through

NAME = "q4_0"
GGML_TYPE = 2  # GGMLQuantizationType.Q4_0
BLOCK = 32
BLOCK_BYTES = 2 + BLOCK // 2


def _blocks(w: torch.Tensor) -> torch.Tensor:
    if w.shape[-1] % BLOCK:
        raise ValueError(f"Q4_0 needs rows whose length is a multiple of {BLOCK}, got shape {tuple(w.shape)}")
    return w.reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)


def absmax_scale(w: torch.Tensor) -> torch.Tensor:
    """The scale ggml picks, float32, shape (..., n_blocks): d = (element with largest |x|) / -8."""
    b = _blocks(w.float())
    imax = b.abs().argmax(dim=-1, keepdim=True)
    m = b.gather(-1, imax)
    # ggml starts its search from max = +0.0, so a block of zeros (-0.0 included) gets d = -0.0.
    m = torch.where(m == 0, torch.zeros_like(m), m)
    return (m / -8.0).squeeze(-1)


def quantize(w: torch.Tensor, d: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., n) float -> (codes uint8 (..., n) in 0..15, scales fp16 (..., n/32)).

    With `d` None the scales are ggml's own (bit-exact with quantize_row_q4_0_ref); otherwise
    `d` (..., n/32) is taken as given (rounded to fp16, the precision the file stores), except in
    blocks it would leave without a code 0, where it is cut so that llama.cpp re-quantizes the
    block's values to the same bytes (module docstring, "Re-quantization")."""
    b = _blocks(w.float())
    if _cpu.available() and not b.is_cuda and b.numel():
        codes, d16 = _quantize_cpu(b, d, w.shape)
    else:
        d32 = absmax_scale(w) if d is None else d.to(torch.float16).float()
        codes, d16 = _codes(b, d32, clamp_low=d is not None).reshape(w.shape), d32.to(torch.float16)
    if d is not None:
        codes, d16 = _cut_to_code_zero(b, codes, d16)
    return codes, d16


def _codes(b: torch.Tensor, d32: torch.Tensor, clamp_low: bool = True) -> torch.Tensor:
    """Blocks (..., 32) and float32 scales (...) -> codes uint8 (..., 32)."""
    inv = torch.where(d32 == 0, torch.zeros_like(d32), 1.0 / d32).unsqueeze(-1)
    q = torch.trunc(b * inv + 8.5)
    return (q.clamp(0, 15) if clamp_low else q.clamp(max=15)).to(torch.uint8)


CUT = 1.0 - 2.0**-9  # |d| = |x| / 7.5 * CUT keeps x on code 0 through the fp16 rounding of d (2^-11)


def _cut_to_code_zero(b: torch.Tensor, codes: torch.Tensor, d16: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Given-scale blocks without a code 0 -> the scale re-quantization recovers (module
    docstring, "Re-quantization"); other blocks untouched."""
    cb = codes.reshape(b.shape)
    lacking = ~(cb == 0).any(-1)
    if not lacking.any():
        return codes, d16
    x, d32 = b[lacking], d16[lacking].float()
    side = x * torch.sign(d32).unsqueeze(-1)  # code 0 sits at -8d: the element minimising x * sign(d)
    e = x.gather(-1, side.argmin(-1, keepdim=True)).squeeze(-1)
    new = torch.where(e * d32 < 0, e / -7.5 * CUT, absmax_scale(x).reshape(-1)).to(torch.float16).float()
    q = _codes(x, new)
    still = ~(q == 0).any(-1)  # a subnormal d16: ggml's own scale, which has its code 0 by construction
    if still.any():
        new[still] = absmax_scale(x[still]).reshape(-1).to(torch.float16).float()
        q[still] = _codes(x[still], new[still], clamp_low=False)
    cb, d16 = cb.clone(), d16.clone()
    cb[lacking], d16[lacking] = q, new.to(torch.float16)
    return cb.reshape(codes.shape), d16


def requantizable(w: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 scales as `quantize(w, d)` stores them, mask of the blocks whose d it cut): for a
    learned-scale parameter to follow the cut (train/loop.py), and for the exporter's count."""
    _, d16 = quantize(w, d)
    cut = d16 != d.detach().to(torch.float16)
    return torch.where(cut, d16.float(), d.detach().float()), cut


def _quantize_cpu(b: torch.Tensor, d: torch.Tensor | None, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """The same computation as the torch path below, fused per block (formats/_cpu.py)."""
    x = _cpu.view(b.reshape(-1, BLOCK))
    given = np.empty(0, np.float32) if d is None else d.detach().to(torch.float16).float().reshape(-1).contiguous().numpy()
    codes = np.empty(x.shape, np.uint8)
    d32 = np.empty(x.shape[0], np.float32)
    _cpu.q4_0_codes(x, given, codes, d32)
    return torch.from_numpy(codes).reshape(shape), torch.from_numpy(d32).reshape(b.shape[:-1]).to(torch.float16)


def dequantize(codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """(codes, fp16 scales) -> float32 values (q - 8) * d, as llama.cpp dequantizes them."""
    if _cpu.available() and not codes.is_cuda and codes.numel():
        out = np.empty((codes.numel() // BLOCK, BLOCK), np.float32)
        _cpu.dequantize_blocks(codes.reshape(-1, BLOCK).contiguous().numpy(), np.float32(8.0), d.float().reshape(-1).contiguous().numpy(), out)
        return torch.from_numpy(out).reshape(codes.shape)
    q = _blocks(codes.float()) - 8.0
    return (q * d.float().unsqueeze(-1)).reshape(codes.shape)


def fake_quant(w: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
    """Forward: dequantize(quantize(w, d)) in w's dtype; backward: identity to w (straight-through).

    Gradients to a given `d` are not defined here; learned-scale training wraps this."""
    with torch.no_grad():
        dq = dequantize(*quantize(w, d)).to(w.dtype)
    return straight_through(w, dq)


def pack(codes: torch.Tensor | np.ndarray, d: torch.Tensor | np.ndarray) -> np.ndarray:
    """(codes (rows, n), fp16 scales (rows, n/32)) -> ggml bytes uint8 (rows, n/32 * 18)."""
    codes = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes, dtype=np.uint8)
    d = np.asarray(d.cpu() if isinstance(d, torch.Tensor) else d, dtype=np.float16)
    rows = codes.reshape(-1, codes.shape[-1]).shape[0]
    q = codes.reshape(-1, 2, BLOCK // 2)
    nibbles = q[:, 0, :] | (q[:, 1, :] << np.uint8(4))
    blocks = np.concatenate([d.reshape(-1, 1).view(np.uint8), nibbles], axis=1)
    return blocks.reshape(rows, -1)


def unpack(raw: np.ndarray, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ggml bytes (rows, n/32 * 18) -> (codes uint8 (rows, n), fp16 scales (rows, n/32))."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    rows = raw.reshape(-1, raw.shape[-1]).shape[0]
    blocks = raw.reshape(-1, BLOCK_BYTES)
    d = blocks[:, :2].copy().view(np.float16).reshape(rows, -1)
    nib = blocks[:, 2:]
    codes = np.concatenate([nib & np.uint8(0x0F), nib >> np.uint8(4)], axis=1)
    return codes.reshape(rows, -1), d


def boundary_mask(w: torch.Tensor) -> torch.Tensor:
    """Weights that sit exactly on a rounding boundary of ggml's own Q4_0 (x * id + 8.5 is an
    integer): an ulp of training noise flips their code."""
    b = _blocks(w.float())
    d32 = absmax_scale(w).unsqueeze(-1)
    inv = torch.where(d32 == 0, torch.zeros_like(d32), 1.0 / d32)
    z = b * inv + 8.5
    return (z == torch.floor(z)).reshape(w.shape)


class _LearnedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        codes, d16 = quantize(w, d)
        out = dequantize(codes, d16)
        ctx.save_for_backward(w, codes, d16)
        return out.to(w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w, codes, d16 = ctx.saved_tensors
        n_blocks = d16.shape[-1]
        g = grad.float().reshape(*grad.shape[:-1], n_blocks, BLOCK)
        d = d16.float().unsqueeze(-1)
        x = torch.where(d == 0, torch.zeros_like(g), w.float().reshape(g.shape) / d)  # w in units of d
        q = codes.float().reshape(g.shape) - 8.0
        inside = (x >= -8.5) & (x < 7.5)  # the codes' reach: trunc(x + 8.5) in 0..15 unclipped
        grad_w = torch.where(inside, g, torch.zeros_like(g)).reshape(w.shape).to(w.dtype)
        grad_d = (g * torch.where(inside, q - x, q)).sum(-1)
        return grad_w, grad_d


def learned_fake_quant(w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Q4_0 with learned scales d (..., n/32), LSQ-style: forward dequantize(quantize(w, d));
    backward d out/d d = (q - 8) - w/d inside the grid, (q - 8) where w is clipped, and the
    weight's gradient straight through inside the grid, zero where clipped."""
    return _LearnedScale.apply(w, d)

"""ggml Q8_0: blocks of 32 weights, one fp16 scale each, int8 codes.

Reference: ggml `quantize_row_q8_0_ref`, bit-identical to `gguf.quants.Q8_0`:

    d  = max|x| / 127                  (float32)
    id = 1/d, or 0 where d == 0
    q  = roundf(x * id)                (round half AWAY from zero, as C's roundf)
    stored: fp16(d), value = q * fp16(d)

Trap: `torch.round` rounds half to even and is one step off on ties; `_round_half_away`
below is exact for every float32 (floor of the fraction doubled, never `floor(a + 0.5)`, which
itself rounds for a just under 0.5).

llama.cpp's CPU kernels also use Q8_0 for *activations* before Q4_0/Q8_0 matrix products, but
the SIMD path differs from this weight reference (id = 127/amax, round half to even): see
`activation_fake_quant`.

Byte layout of one 34-byte block: fp16 d, then 32 int8 codes.
"""

from __future__ import annotations

import numpy as np
import torch

from . import _cpu
from ._ste import straight_through

NAME = "q8_0"
GGML_TYPE = 8  # GGMLQuantizationType.Q8_0
BLOCK = 32
BLOCK_BYTES = 2 + BLOCK


def _blocks(w: torch.Tensor) -> torch.Tensor:
    if w.shape[-1] % BLOCK:
        raise ValueError(f"Q8_0 needs rows whose length is a multiple of {BLOCK}, got shape {tuple(w.shape)}")
    return w.reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    a = x.abs()
    f = torch.floor(a)
    return torch.copysign(f + torch.floor(2.0 * (a - f)), x)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., n) float -> (codes int8 (..., n), scales fp16 (..., n/32)); bit-exact with ggml."""
    b = _blocks(w.float())
    if _cpu.available() and not b.is_cuda and b.numel():
        x = _cpu.view(b.reshape(-1, BLOCK))
        codes, d32 = np.empty(x.shape, np.int8), np.empty(x.shape[0], np.float32)
        _cpu.q8_0_codes(x, codes, d32)  # the computation below, fused per block
        return torch.from_numpy(codes).reshape(w.shape), torch.from_numpy(d32).reshape(b.shape[:-1]).to(torch.float16)
    d = b.abs().amax(dim=-1) / 127.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d).unsqueeze(-1)
    q = _round_half_away(b * inv)
    return q.to(torch.int8).reshape(w.shape), d.to(torch.float16)


def dequantize(codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    if _cpu.available() and not codes.is_cuda and codes.numel():
        out = np.empty((codes.numel() // BLOCK, BLOCK), np.float32)
        _cpu.dequantize_blocks(codes.reshape(-1, BLOCK).contiguous().numpy(), np.float32(0.0), d.float().reshape(-1).contiguous().numpy(), out)
        return torch.from_numpy(out).reshape(codes.shape)
    q = _blocks(codes.float())
    return (q * d.float().unsqueeze(-1)).reshape(codes.shape)


def fake_quant(w: torch.Tensor) -> torch.Tensor:
    """Forward: dequantize(quantize(w)); backward: straight-through."""
    with torch.no_grad():
        dq = dequantize(*quantize(w)).to(w.dtype)
    return straight_through(w, dq)


def activation_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """Activations as llama.cpp's x86 SIMD `quantize_row_q8_0` rounds them before a Q4_0/Q8_0
    matrix product: id = 127 / amax (not 1/d), round half to even, values q * fp16(amax/127).
    Forward only (no gradient is needed in the runtime-faithful reference)."""
    b = _blocks(x.float())
    amax = b.abs().amax(dim=-1, keepdim=True)
    # Not `127.0 / amax`: torch computes scalar / tensor as a reciprocal times the scalar (two
    # roundings); ggml's 127.f / amax rounds once, and the one-ulp difference moves codes on ties.
    inv = torch.where(amax == 0, torch.zeros_like(amax), torch.full_like(amax, 127.0) / amax)
    q = torch.round(b * inv)
    d = (amax / 127.0).to(torch.float16).float()
    return (q * d).reshape(x.shape).to(x.dtype)


def pack(codes: torch.Tensor | np.ndarray, d: torch.Tensor | np.ndarray) -> np.ndarray:
    codes = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes, dtype=np.int8)
    d = np.asarray(d.cpu() if isinstance(d, torch.Tensor) else d, dtype=np.float16)
    rows = codes.reshape(-1, codes.shape[-1]).shape[0]
    blocks = np.concatenate([d.reshape(-1, 1).view(np.uint8), codes.reshape(-1, BLOCK).view(np.uint8)], axis=1)
    return blocks.reshape(rows, -1)


def unpack(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    rows = raw.reshape(-1, raw.shape[-1]).shape[0]
    blocks = raw.reshape(-1, BLOCK_BYTES)
    d = blocks[:, :2].copy().view(np.float16).reshape(rows, -1)
    codes = blocks[:, 2:].copy().view(np.int8).reshape(rows, -1)
    return codes, d


def boundary_mask(w: torch.Tensor) -> torch.Tensor:
    """Weights that sit exactly on a rounding boundary of Q8_0 (|x| / d + 0.5 is an integer)."""
    b = _blocks(w.float())
    d32 = (b.abs().amax(-1) / 127.0).unsqueeze(-1)
    inv = torch.where(d32 == 0, torch.zeros_like(d32), 1.0 / d32)
    z = (b * inv).abs() + 0.5
    return (z == torch.floor(z)).reshape(w.shape)

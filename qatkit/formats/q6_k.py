"""ggml Q6_K: super-blocks of 256 weights, 16 sub-blocks of 16, 6-bit codes.

Bit-exact with ggml `quantize_row_q6_K_ref` (ggml-quants.c), which is what `ggml_quantize_chunk`
and llama.cpp's quantizer use for Q6_K when no importance matrix is given. `gguf` can read Q6_K
but not write it; this module writes it.

Per 16-element sub-block x (ggml `make_qx_quants(16, 32, x, L, rmse_type=1, weights=NULL)`):

    max   = the element with the largest |x|, sign kept (first one on ties)
    if |max| < 1e-15 (GROUP_MAX_EPS): codes L = 0 (not 32), scale 0
    w     = x*x                                      (rmse_type 1 weights)
    for each candidate iscale, first -32/max, then -(32 + 0.1*is)/max for is = -9..-1, 1..9:
        l     = clamp(nearest_int(iscale*x), -32, 31)
        sumlx = sum of (w*x)*l,  suml2 = sum of (w*l)*l    (float32, summed in element order)
    the first candidate sets scale = sumlx/suml2 (0 if suml2 == 0) and best = scale*sumlx;
    a later one replaces it when suml2 > 0 and sumlx*sumlx > best*suml2, strictly
    L = l + 32 of the winning candidate; the sub-block's float scale is `scale` (negative when
    max > 0: codes run opposite to x and the scale flips them back).

Per super-block:

    max_scale = the sub-block scale with the largest |scale|, sign kept (first one on ties)
    if |max_scale| < 1e-15: the whole 210-byte block is zeros
    iscale    = -128/max_scale
    d         = fp16(1/iscale)                        (super-block scale, stored)
    sc[j]     = min(127, nearest_int(iscale*scale[j])) (int8, stored)
    for each sub-block with dj = float(d)*sc[j] != 0:  L = clamp(nearest_int(x/dj), -32, 31) + 32
    sub-blocks with dj == 0 KEEP the codes from the search above (they decode to 0 anyway,
    but they are in the bytes)
    value = d * sc[j] * (L - 32)

Traps (tests/test_q6_k.py breaks on each one):
- nearest_int is `(fval + 12582912.f)` read as int bits: round half to EVEN (not C's roundf),
  applied to the float32-rounded product/quotient (x/dj is a true division, not x * (1/dj)).
  Emulated bit for bit here (`_nearest_int`), so even non-finite inputs to the last step
  (fp16 d overflowing to inf for |x| > ~2.6e8) give ggml's codes.
- Every step is float32, one rounding per C operator, left to right: `w*x*l` is (w*x)*l. No
  fused multiply-add: numpy ufuncs do not fuse. (ggml-base is built for baseline x86-64, so the
  C code has no FMA there either: its disassembly has no vfmadd. A build that contracts
  `sumlx += w*x*l` into an FMA, e.g. GCC on aarch64, can produce other bytes.)
- sumlx and suml2 are sequential float32 sums over the 16 elements. A pairwise or SIMD `sum()`
  rounds differently, and since candidates are compared by `sumlx^2 > best*suml2` (strict), that
  picks another scale in ~3% of random super-blocks. Here the sums run element by element,
  vectorized across sub-blocks.
- Ties: the first maximum wins, both for |x| in a sub-block and for |scale| in a super-block.
- Codes are finally re-derived from fp16(d)*sc (not from the searched scale), except where that
  product is 0: there the searched codes stay (all-zero sub-blocks: 0, not 32).
- Small weights: d is fp16. If a super-block's largest |x| is below ~1e-4, d rounds to 0 and the
  whole block decodes to zeros; below ~0.25 d is an fp16 subnormal (fewer significant bits).
  That is ggml's behaviour, reproduced, not a bug here.
- Rows must be a multiple of 256 long (e.g. a 640-wide embedding cannot be Q6_K; llama.cpp's
  quantizer falls back to Q8_0 for such tensors).

Byte layout of one 210-byte block: ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16],
fp16 d. For each half h (elements 128h .. 128h+127) and l in 0..31, with L the codes of the half:
ql[64h + l] = L[l] & 15 | (L[l+64] & 15) << 4, ql[64h + 32 + l] = L[l+32] & 15 | (L[l+96] & 15) << 4,
qh[32h + l] = L[l]>>4 | (L[l+32]>>4) << 2 | (L[l+64]>>4) << 4 | (L[l+96]>>4) << 6.
"""

from __future__ import annotations

import numpy as np
import torch

NAME = "q6_k"
GGML_TYPE = 14  # GGMLQuantizationType.Q6_K
BLOCK = 256
BLOCK_BYTES = BLOCK // 2 + BLOCK // 4 + BLOCK // 16 + 2  # ql, qh, scales, d = 210

_SUB = 16  # elements per sub-block
_NMAX = 32
_EPS = np.float32(1e-15)  # GROUP_MAX_EPS
_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23
_CHUNK = 2048  # super-blocks per chunk: the working set stays in cache (~2 MB per array)

# Plain numpy: every float32 operator rounds once, and it runs on the calling thread. (torch's
# intra-op threads made this 10x slower on a busy 2-core machine.)


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml nearest_int, bit for bit: int bits of float32(v + 1.5*2**23), low 23 bits, minus 2**22.

    Round half to even for |v| < 2**22; for anything else (inf, NaN, huge) the same garbage ggml
    gets."""
    bits = (v + _MAGIC).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _seq_sum(t: np.ndarray) -> np.ndarray:
    """Sum (16, ...) over axis 0 in element order, float32, as C's `s += t[i]` loop."""
    s = t[0].copy()
    for i in range(1, t.shape[0]):
        s += t[i]
    return s


def _search_scales(xt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(16, 32, ., rmse_type 1) for every sub-block at once.

    xt: (16, m) float32, column k = sub-block k. Returns (scale (m,) float32, codes L (16, m)
    int32 in 0..63; all-zero sub-blocks get scale 0 and codes 0)."""
    imax = np.abs(xt).argmax(axis=0)[None]  # first index of the largest |x|, like `ax > amax`
    vmax = np.take_along_axis(xt, imax, axis=0)[0]
    zero = np.abs(vmax) < _EPS
    # Zero sub-blocks: any nonzero max keeps the arithmetic finite; their results are discarded.
    vmax = np.where(zero, np.float32(1), vmax)

    w = xt * xt
    wxw = np.stack([w * xt, w])  # (2, 16, m): terms (w*x)*l and (w*l)*l share the l
    lf = np.empty_like(xt)
    t = np.empty_like(wxw)

    def sums(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        np.multiply(xt, iscale, out=lf)
        np.add(lf, _MAGIC, out=lf)  # nearest_int for |v| < 2**22 in float32: (v + M) - M is exact
        np.subtract(lf, _MAGIC, out=lf)
        np.clip(lf, -_NMAX, _NMAX - 1, out=lf)
        np.multiply(wxw, lf, out=t)
        np.multiply(t[1], lf, out=t[1])
        s = _seq_sum(t.transpose(1, 0, 2))  # (2, m)
        return s[0], s[1]

    best_iscale = np.float32(-_NMAX) / vmax
    sumlx, suml2 = sums(best_iscale)
    scale = np.where(suml2 != 0, sumlx / suml2, np.float32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        c = np.float32(_NMAX) + np.float32(0.1) * np.float32(step)  # 32 + 0.1f*is, each rounded
        iscale = -c / vmax
        sumlx, suml2 = sums(iscale)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / suml2
        scale = np.where(take, new_scale, scale)
        best = np.where(take, new_scale * sumlx, best)
        best_iscale = np.where(take, iscale, best_iscale)

    codes = _nearest_int(best_iscale * xt).clip(-_NMAX, _NMAX - 1) + _NMAX
    codes[:, zero] = 0
    scale[zero] = 0
    return scale, codes


def _quantize_chunk(x: np.ndarray) -> np.ndarray:
    """x (nb, 256) float32 -> bytes (nb, 210)."""
    nb = x.shape[0]
    nsub = nb * (BLOCK // _SUB)
    xt = np.ascontiguousarray(x.reshape(nsub, _SUB).T)  # (16, nsub): element i of every sub-block
    scale, codes = _search_scales(xt)

    scales = scale.reshape(nb, BLOCK // _SUB)
    sabs = np.abs(scales)
    sabs[np.isnan(sabs)] = -1  # C's `abs_scale > max_abs_scale` skips NaN
    max_scale = np.take_along_axis(scales, sabs.argmax(axis=1)[:, None], axis=1)[:, 0]
    empty = ~(np.abs(max_scale) >= _EPS)  # also true where every scale is NaN
    max_scale = np.where(empty, np.float32(1), max_scale)

    iscale = np.float32(-128) / max_scale
    d16 = (np.float32(1) / iscale).astype(np.float16)
    sc = np.minimum(_nearest_int(iscale[:, None] * scales), 127)
    sc8 = sc.astype(np.int8)  # the int8 store wraps (only ever relevant for garbage input)
    dj = d16.astype(np.float32)[:, None] * sc8.astype(np.float32)  # (nb, 16)

    # Re-derive codes from the stored scales where dj != 0; elsewhere keep the searched ones.
    djt = dj.reshape(nsub)
    requant = _nearest_int(xt / djt).clip(-_NMAX, _NMAX - 1) + _NMAX
    codes = np.where(djt != 0, requant, codes)

    L = codes.T.reshape(nb, 2, 4, 32).astype(np.uint8)  # [block, half, quarter, l]
    ql = (L[:, :, 0:2] & 0x0F) | ((L[:, :, 2:4] & 0x0F) << 4)  # (nb, 2, 2, 32)
    hi = L >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # (nb, 2, 32)

    out = np.empty((nb, BLOCK_BYTES), dtype=np.uint8)
    out[:, 0:128] = ql.reshape(nb, 128)
    out[:, 128:192] = qh.reshape(nb, 64)
    out[:, 192:208] = sc8.view(np.uint8)
    out[:, 208:210] = d16.view(np.uint8).reshape(nb, 2)
    out[empty] = 0
    return out


def quantize_bytes(w: torch.Tensor) -> np.ndarray:
    """w (rows, n) float -> ggml Q6_K bytes uint8 (rows, n/256 * 210), identical to ggml's
    quantize_row_q6_K_ref (no importance matrix)."""
    w = torch.as_tensor(w)
    if w.dim() != 2 or w.shape[-1] % BLOCK:
        raise ValueError(f"Q6_K needs 2-D (rows, n) with n a multiple of {BLOCK}, got shape {tuple(w.shape)}")
    rows, n = w.shape
    x = w.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().reshape(-1, BLOCK)
    out = np.empty((x.shape[0], BLOCK_BYTES), dtype=np.uint8)
    with np.errstate(all="ignore"):
        for s in range(0, x.shape[0], _CHUNK):
            out[s : s + _CHUNK] = _quantize_chunk(x[s : s + _CHUNK])
    return out.reshape(rows, n // BLOCK * BLOCK_BYTES)


def dequantize_bytes(raw: np.ndarray, n: int) -> np.ndarray:
    """ggml Q6_K bytes uint8 (rows, n/256 * 210) -> float32 (rows, n), as llama.cpp decodes them."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if n % BLOCK:
        raise ValueError(f"Q6_K needs rows whose length is a multiple of {BLOCK}, got n={n}")
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, n // BLOCK * BLOCK_BYTES)
    return dequantize(raw, GGMLQuantizationType.Q6_K).astype(np.float32, copy=False).reshape(raw.shape[0], n)


ACT_BLOCK = 256  # Q8_K: the activation blocks a Q6_K product rounds its input to


def activation_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """Activations as ggml's `quantize_row_q8_K_ref` (the x86 `quantize_row_q8_K`) rounds them
    before a Q6_K product: per 256, iscale = -127/max (max = the first value of largest |x|),
    q = min(127, round-half-even(iscale*x)), value = q * (1/iscale), all float32."""
    if x.shape[-1] % ACT_BLOCK:
        raise ValueError(f"Q8_K needs rows whose length is a multiple of {ACT_BLOCK}, got {tuple(x.shape)}")
    b = x.float().reshape(*x.shape[:-1], x.shape[-1] // ACT_BLOCK, ACT_BLOCK)
    mx = b.gather(-1, b.abs().argmax(dim=-1, keepdim=True))  # argmax returns the first maximum
    zero = mx == 0
    # Trap: torch computes `scalar / tensor` as reciprocal times scalar, two roundings; C's
    # -127.f/max is one. Divide tensor by tensor.
    iscale = torch.where(zero, torch.zeros_like(mx), torch.full_like(mx, -127.0) / mx)
    q = torch.round(iscale * b).clamp(max=127.0)  # nearest_int's magic-number add rounds half to even
    d = torch.where(zero, torch.zeros_like(mx), torch.ones_like(mx) / iscale)
    return (q * d).reshape(x.shape).to(x.dtype)

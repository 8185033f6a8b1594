"""Fused CPU kernels for the block formats' quantize step, compiled with numba.

Eager torch runs a Q4_0 quantize as ~12 separate passes over the weights (~7 s for the 100M
decoder weights of Gemma 3 270M on 2 cores: slower than the training step it serves). These
kernels do one pass per block with the very same float32 operations, in the same order, as
the torch code in q4_0.py / q8_0.py (which stays the definition, and the path for GPU tensors);
tests check both paths bit for bit against each other and against ggml.

Trap: numba (LLVM) does not contract a*b + c into a fused multiply-add unless fastmath is on, so
`x * id + 8.5` rounds twice, as ggml's reference does. Every constant is float32, since a float64
constant would silently promote the arithmetic.
"""

from __future__ import annotations

import numpy as np

try:
    from numba import njit, prange
except ImportError:  # the torch path serves
    njit = None

F32 = np.float32

if njit is not None:

    @njit(parallel=True, cache=True)
    def q4_0_codes(x, given_d, codes, d_out):  # pragma: no cover - compiled
        """x (n, 32) f32 -> codes (n, 32) u8 and d_out (n,) f32 (ggml's d, or given_d if it has n rows)."""
        n = x.shape[0]
        use_given = given_d.shape[0] == n
        for i in prange(n):
            if use_given:
                d = given_d[i]
            else:
                amax = F32(0.0)
                mx = F32(0.0)  # ggml starts from +0.0: a block of zeros gets d = -0.0
                for j in range(32):
                    a = abs(x[i, j])
                    if a > amax:
                        amax = a
                        mx = x[i, j]
                d = mx / F32(-8.0)
            d_out[i] = d
            inv = F32(1.0) / d if d != F32(0.0) else F32(0.0)
            for j in range(32):
                q = np.trunc(x[i, j] * inv + F32(8.5))
                if q > F32(15.0):
                    q = F32(15.0)
                if q < F32(0.0):
                    q = F32(0.0)
                codes[i, j] = np.uint8(q)

    @njit(parallel=True, cache=True)
    def q8_0_codes(x, codes, d_out):  # pragma: no cover - compiled
        """x (n, 32) f32 -> codes (n, 32) i8 and d_out (n,) f32; rounding half away from zero."""
        for i in prange(x.shape[0]):
            amax = F32(0.0)
            for j in range(32):
                a = abs(x[i, j])
                if a > amax:
                    amax = a
            d = amax / F32(127.0)
            d_out[i] = d
            inv = F32(1.0) / d if d != F32(0.0) else F32(0.0)
            for j in range(32):
                v = x[i, j] * inv
                a = abs(v)
                f = np.floor(a)
                r = f + np.floor(F32(2.0) * (a - f))
                codes[i, j] = np.int8(r if v >= F32(0.0) else -r)

    @njit(parallel=True, cache=True)
    def dequantize_blocks(codes, offset, d, out):  # pragma: no cover - compiled
        """out (n, 32) f32 = (codes - offset) * d[i]."""
        for i in prange(codes.shape[0]):
            for j in range(32):
                out[i, j] = (F32(codes[i, j]) - offset) * d[i]


def available() -> bool:
    return njit is not None


def view(t):
    """A contiguous CPU tensor as a numpy array over the same memory, read-only use. Through
    DLPack, not Tensor.numpy(): numpy() marks the storage unresizable for good, and FSDP2 frees
    a gathered weight after each layer's forward by resizing its storage to zero."""
    return np.from_dlpack(t.detach().contiguous())

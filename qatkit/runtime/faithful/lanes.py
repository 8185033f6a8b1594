"""Matrix products summed in the order of the kernels llama.cpp's x86 CPU build picks (tinyBLAS
lanes, the repacked Q4_0 block order), for the exact faithful mode; `ggml_cpu_build()` reads which
build is loaded."""

from __future__ import annotations

import contextvars
import functools
import logging
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...formats import q8_0
from ...formats._ste import straight_through

log = logging.getLogger(__name__)


# --- matrix products: ggml's summation order --------------------------------------------------
#
# A float32 dot product depends on the order of its sums, and after the roundings above (f16 q, k,
# v and GELU input, Q8_0 activations) an ulp is sometimes a whole f16 or Q8_0 step: a few such
# flips per layer were the rest of the export gap in qwen2/qwen3/gemma3, whose normalised q/k make
# attention sharp. The orders of the kernels llama.cpp's x86 CPU backend picks (llama-cpp-python's
# native build, AVX2 or AVX512 with FMA, llamafile and repack on), for a batch of >= 2 tokens:
# - F32 and F16 weights, and attention's K*Q and V*softmax (f16 x f16): llamafile's tinyBLAS
#   (ggml-cpu/llamafile/sgemm.cpp, needs K % lanes == 0). Each output keeps `lanes` float32
#   partial sums (16 with AVX512F, 8 with AVX/AVX2): lane j adds the products of elements
#   j, j+lanes, j+2*lanes, ... by fma; hsum then folds halves (lane j + lane j+lanes/2, ...).
# - Q4_0 weights with rows % 8 == 0: repacked to q4_0_8x8 (ggml-cpu/repack.cpp); per 32-block the
#   integer dot is exact, and acc = fma(float(isum), d_w*d_a, acc) runs over the blocks in order
#   (arch/x86/repack.cpp, gemm_q4_b32_8x8_q8_0_lut_avx).
# - Q8_0 weights, and Q4_0 with rows % 8 != 0: tinyBLAS_Q0_AVX. Per block, 8 float lanes each hold
#   the integer dot of 4 consecutive elements, acc_j = fma(d_w*d_a, lane_j, acc_j) over blocks,
#   then the 8 lanes fold as above.
# In float64 each block's products and their sums are exact (at most 38 significant bits), so an
# fma is one float64 add rounded to float32 (a double rounding that differs from the fma's single
# one with probability ~2^-29). Q6_K products (the head, usually) keep torch's order: nothing is
# rounded after them but the logits themselves.

_EXACT_CHUNK = 1 << 22  # elements of one float64 work tensor (32 MB)


@dataclass(frozen=True)
class GgmlCpu:
    lanes: int  # tinyBLAS float lanes: 16 (AVX512F) or 8 (AVX/AVX2)
    repack: bool  # Q4_0 weights repacked (q4_0_8x8)


@functools.cache
def ggml_cpu_build() -> GgmlCpu | None:
    """The summation orders of the ggml CPU backend llama-cpp-python loaded, from its feature
    list (llama_print_system_info: the flags the library was compiled with); None where they are
    not the x86 ones modelled here (then products keep torch's order)."""
    try:
        import llama_cpp

        info = llama_cpp.llama_print_system_info().decode()
    except Exception:  # no llama.cpp at all: nothing to be faithful to
        return None
    flags = {k: v == "1" for k, v in re.findall(r"(\w+) = (\d)", info)}
    if not (flags.get("FMA") and flags.get("LLAMAFILE") and (flags.get("AVX2") or flags.get("AVX512"))):
        log.info("ggml CPU build %r: matrix products keep torch's summation order", info)
        return None
    return GgmlCpu(lanes=16 if flags.get("AVX512") else 8, repack=bool(flags.get("REPACK")))


def _fma_f32(acc: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """float32 fma(a, b, acc) given the exact float64 product a*b."""
    return (acc.double() + exact).float()


def _fold_lanes(acc: torch.Tensor) -> torch.Tensor:
    """(..., lanes) -> (...): hsum's tree, lane j + lane j+half at each step."""
    while acc.shape[-1] > 1:
        half = acc.shape[-1] // 2
        acc = acc[..., :half] + acc[..., half:]
    return acc[..., 0]


def _row_chunks(m: int, per_row: int):
    step = max(1, _EXACT_CHUNK // max(1, per_row))
    return [(i, min(m, i + step)) for i in range(0, m, step)]


def tinyblas_matmul(a: torch.Tensor, b: torch.Tensor, lanes: int, f16_values: bool = False) -> torch.Tensor:
    """a (..., M, K) times b (..., N, K) transposed, float32, in tinyBLAS's order; K is padded
    with zeros to a multiple of `lanes` (an added 0 changes no partial sum). With f16_values (both
    operands hold f16 values) every product is exact in float32 and so is the work."""
    k = a.shape[-1]
    if k % lanes:
        pad = lanes - k % lanes
        a, b = F.pad(a, (0, pad)), F.pad(b, (0, pad))
    work = torch.float32 if f16_values else torch.float64
    a, b = a.to(work), b.to(work)
    m, n = a.shape[-2], b.shape[-2]
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    out = torch.empty(*batch, m, n, dtype=torch.float32, device=a.device)
    for r0, r1 in _row_chunks(m, batch.numel() * n * lanes):
        acc = None
        for c in range(0, a.shape[-1], lanes):
            prod = a[..., r0:r1, None, c:c + lanes] * b[..., None, :, c:c + lanes]  # exact
            if acc is None:
                acc = prod.float()
            elif f16_values:
                acc += prod  # float32 add of an exact product: the fma's one rounding
            else:
                acc = _fma_f32(acc, prod)
        out[..., r0:r1, :] = _fold_lanes(acc)
    return out


def q0_matmul(x: torch.Tensor, w: torch.Tensor, lanes: int) -> torch.Tensor:
    """x (M, K) Q8_0-rounded activations times w (N, K) dequantized Q4_0/Q8_0 weights, float32:
    lanes=1 the repacked Q4_0 order, lanes=8 tinyBLAS_Q0_AVX's."""
    m, k = x.shape
    n = w.shape[0]
    nb, sub = k // q8_0.BLOCK, q8_0.BLOCK // lanes
    # (block, lane, rows, sub) and (block, lane, sub, N): lane l holds elements l*sub.. of a block
    xb = x.double().reshape(m, nb, lanes, sub).permute(1, 2, 0, 3)
    wb = w.double().reshape(n, nb, lanes, sub).permute(1, 2, 3, 0)
    out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    for r0, r1 in _row_chunks(m, n * lanes):
        acc = torch.zeros(lanes, r1 - r0, n, dtype=torch.float32, device=x.device)
        prod = torch.empty(lanes, r1 - r0, n, dtype=torch.float64, device=x.device)
        for blk in range(nb):
            # d_a*d_w * (integer dot of each lane's elements): exact in float64; then
            # acc = fma(d_a*d_w, isum, acc) as one float64 add rounded to float32
            torch.bmm(xb[blk, :, r0:r1], wb[blk], out=prod)
            prod += acc
            acc.copy_(prod)
        out[r0:r1] = _fold_lanes(acc.movedim(0, -1))
    return out


def _linear_exact(wtype: str, build: GgmlCpu):
    """Forward hook of a Linear: its output replaced by ggml's product (from the input the
    pre-hook rounded) plus the bias (a separate ggml_add); None where the order is not modelled."""

    def hook(module, args, output):
        x = args[0]
        rows = x.reshape(-1, x.shape[-1])
        w = module.weight
        with torch.no_grad():
            if wtype == "q4_0" and build.repack and w.shape[0] % 8 == 0:
                exact = q0_matmul(rows, w, 1)
            elif rows.shape[0] < 2:  # llamafile does only batches (sgemm.cpp: n < 2 -> vec_dot)
                return output
            elif wtype in ("q4_0", "q8_0"):
                exact = q0_matmul(rows, w, 8)
            elif rows.shape[-1] % build.lanes == 0:  # f32, f16
                exact = tinyblas_matmul(rows, w.float(), build.lanes, f16_values=wtype == "f16")
            else:
                return output
            if module.bias is not None:
                exact = exact + module.bias.float()
        return straight_through(output, exact.reshape(output.shape).to(output.dtype))

    return hook if wtype in ("q4_0", "q8_0", "f32", "f16") else None


# Inside a context with exact=True: (build or None,); None outside or with exact=False.
_EXACT: contextvars.ContextVar[tuple[GgmlCpu | None] | None] = contextvars.ContextVar("qatkit_faithful_exact", default=None)


def _matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """a @ b_t.transpose(-1, -2) of attention's f16-valued operands, in tinyBLAS's order inside
    a context with a modelled build; the gradient is torch's product's."""
    plain = torch.matmul(a, b_t.transpose(-1, -2))
    build = (_EXACT.get() or (None,))[0]
    if build is None:
        return plain
    with torch.no_grad():
        exact = tinyblas_matmul(a.float(), b_t.float(), build.lanes, f16_values=True)
    return straight_through(plain, exact.to(plain.dtype))


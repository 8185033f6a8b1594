"""The tensor formats qatkit writes, from one table.

Each quantized format lives in its own module with its exact numeric definition. This file
only says, per format name, which ggml type it is, its block size and its bytes per block,
and turns a float tensor into the bytes a GGUF file holds (`encode`) and back (`decode`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import q4_0, q8_0


@dataclass(frozen=True)
class Format:
    name: str
    ggml_type: int  # gguf.GGMLQuantizationType value
    block: int  # elements per block along a row
    block_bytes: int  # bytes per block

    def row_bytes(self, n: int) -> int:
        return n // self.block * self.block_bytes


FORMATS: dict[str, Format] = {
    "f32": Format("f32", 0, 1, 4),
    "f16": Format("f16", 1, 1, 2),
    "q4_0": Format("q4_0", q4_0.GGML_TYPE, q4_0.BLOCK, q4_0.BLOCK_BYTES),
    "q8_0": Format("q8_0", q8_0.GGML_TYPE, q8_0.BLOCK, q8_0.BLOCK_BYTES),
    # Q6_K (super-blocks of 256): ggml writes it for the output / tied embedding in its Q4_0 mix.
    "q6_k": Format("q6_k", 14, 256, 210),
}
BY_GGML_TYPE = {f.ggml_type: f for f in FORMATS.values()}
_CHUNK_ELEMENTS = 1 << 18


def fits(fmt: str, n: int) -> bool:
    """Whether a row of n elements can be stored in `fmt` (whole blocks only)."""
    return n % FORMATS[fmt].block == 0


def encode(w: torch.Tensor, fmt: str, q4_0_scales: torch.Tensor | None = None) -> np.ndarray:
    """A float tensor (rows, n) or (n,) -> the array a GGUF file stores for `fmt`.

    f32/f16 give float arrays of w's shape; block formats give uint8 (rows, bytes per row),
    bit-identical to ggml's reference quantizers. `q4_0_scales` passes learned scales."""
    w = w.detach().float().cpu()
    if fmt == "f32":
        return w.numpy().astype(np.float32, copy=False)
    if fmt == "f16":
        return w.numpy().astype(np.float16)
    if w.dim() != 2:
        raise ValueError(f"{fmt} is for 2-D tensors, got shape {tuple(w.shape)}")
    if fmt in ("q4_0", "q8_0"):
        f = FORMATS[fmt]
        out = np.empty((w.shape[0], f.row_bytes(w.shape[1])), np.uint8)
        # Row chunks of ~256K elements: small temporaries are reused by the allocator instead of
        # page-faulting fresh memory for every elementwise step (measured 3-10x faster whole).
        step = max(1, _CHUNK_ELEMENTS // max(1, w.shape[1]))
        for i in range(0, w.shape[0], step):
            if fmt == "q4_0":
                scales = None if q4_0_scales is None else q4_0_scales[i : i + step]
                out[i : i + step] = q4_0.pack(*q4_0.quantize(w[i : i + step], scales))
            else:
                out[i : i + step] = q8_0.pack(*q8_0.quantize(w[i : i + step]))
        return out
    if fmt == "q6_k":
        from . import q6_k  # imported on use: only the output / tied-embedding tensor needs it

        return q6_k.quantize_bytes(w)
    raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")


def decode(data: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """What a GGUF tensor holds -> float32 array of `shape` (numpy order), for any type gguf knows."""
    import gguf

    if ggml_type in (0, 1):
        return np.asarray(data).astype(np.float32).reshape(shape)
    return gguf.quants.dequantize(np.asarray(data), gguf.GGMLQuantizationType(ggml_type)).reshape(shape).astype(np.float32)

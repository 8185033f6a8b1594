"""The tensor formats qatkit writes to GGUF, registered in one table (gguf-py's pattern).

Each quantized format's exact numerics live in its own module (q4_0.py, q8_0.py, q6_k.py); the
class registered here for it is the one place the rest of qatkit asks about a format: its ggml
type, block size and bytes, how a float tensor becomes the file's bytes and back (`encode`,
`decode`), its training-time fake-quant and learned-scale fake-quant, the weights that sit on a
rounding boundary, and the rounding llama.cpp's CPU backend applies to the *activation* a
product with such a weight takes (Q8_0 in front of Q4_0 and Q8_0, Q8_K in front of Q6_K, f16 in
front of F16, nothing in front of F32).

    from qatkit.formats import FORMATS, get
    get("q4_0").encode(w)            # ggml's bytes, bit-identical to llama.cpp's quantizer
    FORMATS["q8_0"].fake_quant(w)    # what training multiplies with

The mobile (ExecuTorch) schemes are not GGUF types; formats/mobile.py defines them.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from . import q4_0, q6_k, q8_0

_CHUNK_ELEMENTS = 1 << 18


class Format:
    """A GGUF tensor format. Subclasses set the class attributes and override what they support."""

    name: str
    ggml_type: int  # gguf.GGMLQuantizationType value
    block: int = 1  # elements per block along a row
    block_bytes: int  # bytes per block
    trainable = False  # has a training-time fake-quant (the student computes with its values)
    learnable_scales = False  # stores free per-block scales, so learned ones export exactly
    act_block = 1  # the activation rounding's block: rows must be whole multiples of it

    def row_bytes(self, n: int) -> int:
        return n // self.block * self.block_bytes

    def fits(self, n: int) -> bool:
        """Whether a row of n elements can be stored (whole blocks only)."""
        return n % self.block == 0

    def encode(self, w: torch.Tensor, scales: torch.Tensor | None = None) -> np.ndarray:
        """A float tensor (rows, n) or (n,) -> the array a GGUF file stores: float arrays of w's
        shape for float formats, uint8 (rows, bytes per row) for block formats, bit-identical
        to ggml's reference quantizers. `scales`: learned scales where the format takes them."""
        raise NotImplementedError

    def decode(self, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """What a GGUF tensor of this format holds -> float32 array of `shape` (numpy order)."""
        import gguf

        return gguf.quants.dequantize(np.asarray(data), gguf.GGMLQuantizationType(self.ggml_type)).reshape(shape).astype(np.float32)

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        """Forward: the values the file would hold; backward: straight through."""
        raise ValueError(f"{self.name} has no training-time fake-quant")

    def learned_fake_quant(self, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"learned scales are for {', '.join(n for n, f in FORMATS.items() if f.learnable_scales)}, not {self.name}")

    def initial_scales(self, w: torch.Tensor) -> torch.Tensor:
        """The scales PTQ would pick, as the learned ones start (learnable formats only)."""
        raise ValueError(f"{self.name} has no learnable scales")

    def requantizable_scales(self, w: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the learned scales as the quantizer stores them where it must change them so that a
        re-quantization of the values gives the same bytes, mask of those blocks)."""
        raise ValueError(f"{self.name} has no learnable scales")

    def boundary_mask(self, w: torch.Tensor) -> torch.Tensor:
        """Weights exactly on a rounding boundary of the PTQ quantizer (trainable formats)."""
        raise ValueError(f"{self.name} has no training-time quantizer")

    def quantize_codes(self, w: torch.Tensor):
        """(codes, scales) of the PTQ quantizer (trainable formats)."""
        raise ValueError(f"{self.name} has no training-time quantizer")

    def dequantize_codes(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{self.name} has no training-time quantizer")

    def activation_rounding(self, x: torch.Tensor) -> torch.Tensor:
        """The input of a product with a weight of this format, as llama.cpp's CPU backend rounds
        it (`vec_dot_type`); identity where it rounds nothing."""
        return x

    @property
    def rounds_activations(self) -> bool:
        return type(self).activation_rounding is not Format.activation_rounding

    def __repr__(self) -> str:
        return f"<format {self.name}>"


FORMATS: dict[str, Format] = {}


def register(cls: type[Format]) -> type[Format]:
    FORMATS[cls.name] = cls()
    return cls


def get(name: str) -> Format:
    """The registered format `name`, or a clear error naming the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; known: {', '.join(FORMATS)}") from None


@register
class F32(Format):
    name, ggml_type, block_bytes = "f32", 0, 4

    def encode(self, w, scales=None):
        return w.detach().float().cpu().numpy().astype(np.float32, copy=False)

    def decode(self, data, shape):
        return np.asarray(data).astype(np.float32).reshape(shape)


@register
class F16(Format):
    name, ggml_type, block_bytes = "f16", 1, 2

    def encode(self, w, scales=None):
        return w.detach().float().cpu().numpy().astype(np.float16)

    def decode(self, data, shape):
        return np.asarray(data).astype(np.float32).reshape(shape)

    def activation_rounding(self, x):
        """Round to the nearest f16 (ties to even, as F16C's `_cvtps_ph`), back in x's dtype."""
        return x.to(torch.float16).to(x.dtype)


def _encode_blocks(w: torch.Tensor, rows_to_bytes: Callable[[torch.Tensor, int], np.ndarray], fmt: Format) -> np.ndarray:
    """Rows of the last dimension -> their blocks; a 3-D tensor (MoE experts) is its experts'
    rows one after another, as ggml lays it out, and keeps its leading shape."""
    w = w.detach().float().cpu()
    if w.dim() not in (2, 3):
        raise ValueError(f"{fmt.name} is for 2-D and 3-D tensors, got shape {tuple(w.shape)}")
    lead = tuple(w.shape[:-1])
    w = w.reshape(-1, w.shape[-1])
    out = np.empty((w.shape[0], fmt.row_bytes(w.shape[1])), np.uint8)
    # Row chunks of ~256K elements: small temporaries are reused by the allocator instead of
    # page-faulting fresh memory for every elementwise step (measured 3-10x faster whole).
    step = max(1, _CHUNK_ELEMENTS // max(1, w.shape[1]))
    for i in range(0, w.shape[0], step):
        out[i : i + step] = rows_to_bytes(w[i : i + step], i)
    return out.reshape(*lead, out.shape[-1])


class _Trainable(Format):
    """A block format with a training-time quantizer: its module (q4_0.py, q8_0.py) gives
    quantize / dequantize / fake_quant / boundary_mask; products with it round their input to
    Q8_0 blocks (`quantize_row_q8_0`) in llama.cpp's CPU backend."""

    module = None
    trainable = True
    act_block = q8_0.BLOCK

    def fake_quant(self, w):
        return self.module.fake_quant(w)

    def boundary_mask(self, w):
        return self.module.boundary_mask(w)

    def quantize_codes(self, w):
        return self.module.quantize(w)

    def dequantize_codes(self, codes, scales):
        return self.module.dequantize(codes, scales)

    def activation_rounding(self, x):
        return q8_0.activation_fake_quant(x)


@register
class Q4_0(_Trainable):
    name, ggml_type, block, block_bytes, module = q4_0.NAME, q4_0.GGML_TYPE, q4_0.BLOCK, q4_0.BLOCK_BYTES, q4_0
    learnable_scales = True

    def encode(self, w, scales=None):
        return _encode_blocks(w, lambda rows, i: q4_0.pack(*q4_0.quantize(rows, None if scales is None else scales[i : i + len(rows)])), self)

    def learned_fake_quant(self, w, scales):
        return q4_0.learned_fake_quant(w, scales)

    def initial_scales(self, w):
        return q4_0.absmax_scale(w).to(torch.float16).float()

    def requantizable_scales(self, w, scales):
        return q4_0.requantizable(w, scales)


@register
class Q8_0(_Trainable):
    name, ggml_type, block, block_bytes, module = q8_0.NAME, q8_0.GGML_TYPE, q8_0.BLOCK, q8_0.BLOCK_BYTES, q8_0

    def encode(self, w, scales=None):
        return _encode_blocks(w, lambda rows, i: q8_0.pack(*q8_0.quantize(rows)), self)


@register
class Q6_K(Format):
    """Super-blocks of 256: ggml writes it for the output / tied embedding in its Q4_0 mix."""

    name, ggml_type, block, block_bytes = q6_k.NAME, q6_k.GGML_TYPE, q6_k.BLOCK, q6_k.BLOCK_BYTES
    act_block = q6_k.ACT_BLOCK

    def encode(self, w, scales=None):
        w = w.detach().float().cpu()
        if w.dim() != 2:
            raise ValueError(f"{self.name} is for 2-D tensors, got shape {tuple(w.shape)}")
        return q6_k.quantize_bytes(w)

    def activation_rounding(self, x):
        return q6_k.activation_fake_quant(x)


BY_GGML_TYPE = {f.ggml_type: f for f in FORMATS.values()}
TRAINABLE = tuple(n for n, f in FORMATS.items() if f.trainable)


def fits(fmt: str, n: int) -> bool:
    """Whether a row of n elements can be stored in `fmt` (whole blocks only)."""
    return get(fmt).fits(n)


def encode(w: torch.Tensor, fmt: str, q4_0_scales: torch.Tensor | None = None) -> np.ndarray:
    """`get(fmt).encode(w, scales)`: the array a GGUF file stores for `fmt`."""
    return get(fmt).encode(w, q4_0_scales)


def decode(data: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """What a GGUF tensor holds -> float32 array of `shape`, for any type gguf knows."""
    f = BY_GGML_TYPE.get(ggml_type)
    if f is not None:
        return f.decode(data, shape)
    import gguf

    return gguf.quants.dequantize(np.asarray(data), gguf.GGMLQuantizationType(ggml_type)).reshape(shape).astype(np.float32)


__all__ = ["Format", "FORMATS", "BY_GGML_TYPE", "TRAINABLE", "get", "register", "fits", "encode", "decode"]

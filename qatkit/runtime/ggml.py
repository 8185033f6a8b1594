"""The one ctypes binding to ggml's own C code (and the C math library ggml calls).

llama-cpp-python ships ggml's shared libraries in `llama_cpp/lib/`:
- `libggml-base` exports `ggml_quantize_chunk`, the function llama.cpp's own quantizer calls;
  with no importance matrix it runs the `quantize_row_*_ref` reference of each type (Q4_0 = 2,
  Q8_0 = 8, Q6_K = 14, ...): the oracle for tests and the peer in benchmarks;
- `libggml-cpu` exports the softmax and SwiGLU row kernels the faithful mode calls;
- libm's powf/cosf/sinf are what ggml's RoPE uses.

    from qatkit.runtime.ggml import ggml_quantize
    raw = ggml_quantize(w, 14)   # w float32 (rows, n) -> uint8 (rows, row bytes)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)


def _lib_dir() -> Path:
    import llama_cpp  # noqa: F401  (the package that carries the libraries)

    pkg = Path(os.path.dirname(llama_cpp.__file__))
    for d in (pkg / "lib", pkg):
        if any(d.glob("libggml-base*")) or any(d.glob("ggml-base*")):
            return d
    raise FileNotFoundError(f"no libggml-base in {pkg}/lib or {pkg}")


def library(name: str, mode: int = ctypes.DEFAULT_MODE) -> ctypes.CDLL:
    """llama-cpp-python's bundled ggml library `name` ('ggml-base', 'ggml-cpu', ...)."""
    d = _lib_dir()
    for pattern in (f"lib{name}.so*", f"lib{name}*.dylib", f"{name}*.dll"):
        found = sorted(d.glob(pattern))
        if found:
            return ctypes.CDLL(str(found[0]), mode=mode)
    raise FileNotFoundError(f"no {name} library in {d}")


@functools.lru_cache(maxsize=None)
def _lib() -> ctypes.CDLL:
    lib = library("ggml-base")
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,  # enum ggml_type
        ctypes.c_void_p,  # const float * src
        ctypes.c_void_p,  # void * dst
        ctypes.c_int64,  # start
        ctypes.c_int64,  # nrows
        ctypes.c_int64,  # n_per_row
        ctypes.c_void_p,  # const float * imatrix (NULL: the reference quantizer)
    ]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    return lib


def available() -> bool:
    try:
        _lib()
        return True
    except (ImportError, OSError, FileNotFoundError, IndexError):
        return False


def ggml_quantize(w: np.ndarray, ggml_type: int) -> np.ndarray:
    """w float32 (rows, n) -> ggml's bytes uint8 (rows, row_size) for `ggml_type`, no imatrix."""
    lib = _lib()
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"ggml_quantize wants (rows, n), got shape {w.shape}")
    rows, n = w.shape
    row_size = lib.ggml_row_size(ggml_type, n)
    out = np.zeros((rows, row_size), dtype=np.uint8)
    lib.ggml_quantize_init(ggml_type)
    written = lib.ggml_quantize_chunk(ggml_type, w.ctypes.data, out.ctypes.data, 0, rows, n, None)
    if written != rows * row_size:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {rows * row_size}")
    return out


@functools.cache
def libm() -> dict[str, Callable] | None:
    """The C math library's powf, cosf, sinf (what ggml calls, through the same dynamic linker);
    None where it cannot be loaded (then float64 rounded to float32 stands in, an ulp off now and
    then)."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        fns = {}
        for name, nargs in (("powf", 2), ("cosf", 1), ("sinf", 1)):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float] * nargs
            fns[name] = fn
        return fns
    except (OSError, AttributeError):
        log.warning("C math library not found: RoPE cos/sin are correctly rounded, not the C library's")
        return None


@functools.cache
def row_kernels() -> dict[str, Callable] | None:
    """ggml-cpu's ggml_vec_soft_max_f32 and ggml_vec_swiglu_f32; None where not found."""
    try:
        lib = library("ggml-cpu")
        softmax, swiglu = lib.ggml_vec_soft_max_f32, lib.ggml_vec_swiglu_f32
    except (ImportError, FileNotFoundError, OSError, AttributeError) as e:
        log.warning("ggml's softmax/SwiGLU kernels not found (%s): torch's exp stands in", e)
        return None
    softmax.restype, softmax.argtypes = ctypes.c_double, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float]
    swiglu.restype, swiglu.argtypes = None, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return {"softmax": softmax, "swiglu": swiglu}

"""The post-training-quantization baseline: llama.cpp's own quantizer (what `llama-quantize` runs),
called through llama-cpp-python, so the baseline is the file a llama.cpp user would make.

By default llama.cpp mixes types (e.g. for Q4_0 a tied token_embd/output may go to Q6_K or Q8_0);
`pure=True` gives every quantizable tensor the one type, like `llama-quantize --pure`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import tempfile
import time

import llama_cpp

from qatkit import QatkitError
from qatkit.eval import llama as _llama  # installs the llama.cpp log hook

log = logging.getLogger(__name__)

# "q4_0" -> LLAMA_FTYPE_MOSTLY_Q4_0, ... from what this llama_cpp build exposes, plus f32.
FTYPES: dict[str, int] = {
    name[len("LLAMA_FTYPE_MOSTLY_"):].lower(): value
    for name, value in vars(llama_cpp).items() if name.startswith("LLAMA_FTYPE_MOSTLY_")
}
FTYPES["f32"] = llama_cpp.LLAMA_FTYPE_ALL_F32


def llama_quantize(src_path, dst_path, ftype: str = "q4_0", pure: bool = False,
                   n_threads: int | None = None) -> str:
    """Quantize GGUF `src_path` to `dst_path` with llama.cpp; returns dst_path.

    Writes a temporary file beside the destination and renames it on success, so a failed or
    interrupted run never leaves a partial file under the destination name.
    """
    src, dst = os.fspath(src_path), os.fspath(dst_path)
    key = ftype.lower()
    if key not in FTYPES:
        raise QatkitError(f"{dst}: unknown ftype {ftype!r}; choose from {', '.join(sorted(FTYPES))}")
    if not os.path.isfile(src):
        raise QatkitError(f"{src}: no such file")
    dst_dir = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(dst_dir):
        raise QatkitError(f"{dst}: directory {dst_dir} does not exist")

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[key]
    params.allow_requantize = True  # the teacher may itself be quantized (Q4_K_M for the default)
    params.pure = pure
    params.nthread = n_threads or os.cpu_count() or 1

    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.", suffix=".tmp", dir=dst_dir)
    os.close(fd)
    ok = False
    _llama._errors.clear()
    t0 = time.perf_counter()
    try:
        rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
        if rc != 0:
            reason = _llama._native_reason(f"return code {rc}")
            raise QatkitError(f"{src}: llama.cpp failed to quantize it to {key} ({reason})")
        os.replace(tmp, dst)
        ok = True
    finally:
        if not ok and os.path.exists(tmp):
            os.unlink(tmp)
    log.info("%s -> %s (%s%s, %.1f MB, %.1f s)", src, dst, key, ", pure" if pure else "",
             os.path.getsize(dst) / 1e6, time.perf_counter() - t0)
    return dst

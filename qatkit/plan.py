"""Which tensor gets which format: the per-tensor plan.

The default follows llama.cpp's own choice for a Q4_0 (or Q8_0) file, so that qatkit's file and
`llama-quantize`'s can be compared tensor for tensor:
- 1-D tensors (norms, biases): f32;
- the output head, or the token embedding when it doubles as the head (tied): Q6_K where its
  row width is a multiple of 256, else Q8_0 (Q8_0 in a Q8_0 file);
- every other 2-D weight: the file's format.
`pure` puts every 2-D tensor in the file's format, like `llama-quantize --pure`.

A row width the format cannot take (not whole blocks) falls back to f16 with a warning, or is
refused under `pure`. A plan is a plain dict {GGUF tensor name: format name}, saved as JSON.
"""

from __future__ import annotations

import logging

from . import QatkitError
from .formats import FORMATS, fits

log = logging.getLogger(__name__)

FILE_FORMATS = ("q4_0", "q8_0", "f16", "f32")
# llama.cpp's LLAMA_FTYPE_* for general.file_type
FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}


def default_plan(shapes: dict[str, tuple[int, ...]], fmt: str, pure: bool = False) -> dict[str, str]:
    """shapes: GGUF tensor name -> numpy-order shape (rows, width)."""
    if fmt not in FILE_FORMATS:
        raise QatkitError(f"format {fmt!r} is not one qatkit writes (choose from: {', '.join(FILE_FORMATS)})")
    head = "output.weight" if "output.weight" in shapes else "token_embd.weight"
    plan: dict[str, str] = {}
    fallbacks: list[str] = []
    for name, shape in shapes.items():
        width = shape[-1]
        if len(shape) < 2 or fmt == "f32":
            plan[name] = "f32"
            continue
        want = fmt
        if name == head and not pure and fmt in ("q4_0", "q8_0"):
            want = "q6_k" if fmt == "q4_0" and fits("q6_k", width) else "q8_0"
        if not fits(want, width):
            if pure:
                raise QatkitError(f"{name} {tuple(shape)}: row width {width} is not a multiple of {FORMATS[want].block}, so {want} cannot store it (drop --pure to let it fall back to f16)")
            fallbacks.append(f"{name} {tuple(shape)}")
            want = "f16"
        plan[name] = want
    if fallbacks:
        log.warning("%d tensors have rows that are not whole %s blocks; writing them as f16: %s", len(fallbacks), fmt, ", ".join(fallbacks))
    return plan

"""The trained model where users already are: a Hugging Face checkpoint and an mlx-lm directory,
each carrying the very numbers of qatkit's GGUF file.

Both start from that file (`file_valued`): the student (a finished run's, rebuilt from its
directory) or an untrained MODEL is written as qatkit's GGUF, and its values are read back into
the model, so every tensor holds what llama.cpp computes with.

- `--format hf`: float32 safetensors + config + tokenizer (export/hf.py). float32 is the one dtype
  that holds every value of a Q4_0/Q8_0 file exactly (bf16 keeps 8 significant bits, a Q4_0
  block's extreme -8d needs d's 11; f16 holds Q4_0 but not Q8_0's 127d nor the float norms), so
  llama.cpp's own path (its converter to a float GGUF, then its quantizer) rebuilds the file's
  Q4_0/Q8_0 bytes: each block's extreme element sits on code 0, whence ggml recovers d exactly
  (learned scales are cut to keep it there: formats/q4_0.py). Q6_K tensors are the exception:
  its scale search is not idempotent, so `requantize_check` counts the super-blocks that differ.
- `--format mlx`: Q4_0 blocks as MLX 4-bit affine groups of 32 (scale d, bias -8d), Q8_0 as
  8-bit ones, in float32 (export/mlx.py).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .. import QatkitError
from ..export.gguf import export_model, load_gguf_weights, read_gguf_tensors
from ..export.provenance import describe
from ..models import gguf_meta
from ..models.load import load, resolve
from ..runtime.llamacpp import llama_quantize

log = logging.getLogger(__name__)


def is_run_dir(spec: str | os.PathLike) -> bool:
    """A qatkit run directory (its config.json is a run's, not a model's)."""
    path = Path(spec) / "config.json"
    if not path.is_file():
        return False
    try:
        conf = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(conf, dict) and "qat" in conf and "train" in conf and "model_type" not in conf


def file_valued(spec: str, fmt: str, pure: bool, plan_file: str | None, gguf_path: Path, progress: bool = True) -> dict:
    """Write RUN_DIR's trained student, or MODEL quantized without training, as qatkit's GGUF at
    `gguf_path`, and return {"model" (holding the file's values, HF layout), "tokenizer", "source",
    "plan", "format", "provenance"}."""
    if is_run_dir(spec):
        from ..train.run import trained_student
        from .gguf import write_trained

        trained = trained_student(Path(spec))
        cfg = trained["config"]
        if fmt not in (None, cfg.qat.fmt) or pure or plan_file:
            raise QatkitError(f"{spec}: a run directory exports what it trained ({cfg.qat.fmt}{' pure' if cfg.qat.pure else ''}); drop --quant/--pure/--plan")
        plan_file = cfg.qat.plan
        info = write_trained(trained, gguf_path, progress)
        model, tokenizer, source, fmt = trained["student"], trained["tokenizer"], trained["source"], cfg.qat.fmt
        training = info["training"]
    else:
        from ..prepare import model_plan

        source = resolve(spec)
        model, tokenizer = load(source)
        fmt = fmt or "q4_0"
        plan = model_plan(model, source.arch, fmt, pure, plan_file) if plan_file else None
        info = export_model(model, tokenizer, source, gguf_path, fmt, pure, plan=plan, progress=progress)
        training = None
    load_gguf_weights(model, source.arch, gguf_path)
    template = gguf_meta.get(source.gguf_metadata or {}, "tokenizer.chat_template")
    if template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template  # transformers' GGUF reader leaves a GGUF source's template behind
    return {"model": model.eval(), "tokenizer": tokenizer, "source": source, "plan": info["plan"], "format": fmt, "pure": info["pure"], "plan_file": plan_file,
            "provenance": describe(info["plan"], fmt, training)}


def export(spec: str, out: Path, kind: str, fmt: str | None = None, pure: bool = False, plan_file: str | None = None, progress: bool = True,
           verify: bool = False) -> dict:
    """`qatkit export SPEC --format hf|mlx --out DIR`: returns what was written; `verify` (hf):
    with `requantize_check`'s result under "verify"."""
    if kind not in ("hf", "mlx"):
        raise QatkitError(f"--format {kind}: hf or mlx")
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.gguf-", dir=out.parent) as d:  # beside the output: a real model's GGUF is GBs
        gguf_path = Path(d) / "qat.gguf"
        m = file_valued(spec, fmt, pure, plan_file, gguf_path, progress)
        if kind == "hf":
            from ..export.hf import write_hf

            info = write_hf(m["model"], m["tokenizer"], out, m["provenance"])
            moved = not_fixed_points(gguf_path)
            if moved:
                log.warning("llama.cpp's Q6_K is not its own fixed point: re-quantizing this export writes other bytes for %s (the Q4_0/Q8_0 "
                            "tensors come back byte for byte)", ", ".join(
                                f"{n} in {k} of {total} super-blocks ({'the same values' if not v else f'{v} with other values'})"
                                for n, (k, v, total) in moved.items()))
            if verify and m["plan_file"]:
                log.warning("--verify skipped: llama.cpp's quantizer applies its own mix, not the plan %s", m["plan_file"])
            elif verify:
                info["verify"] = requantize_check(out, gguf_path, m["format"], m["pure"])
        else:
            from ..export.mlx import write_mlx

            info = write_mlx(m["model"], m["tokenizer"], gguf_path, m["source"].arch, out, m["provenance"], progress)
    return {**info, "format": m["format"]}


def not_fixed_points(gguf_path: Path) -> dict[str, tuple[int, int, int]]:
    """{Q6_K tensor: (super-blocks whose bytes a re-quantization of their values changes, those
    whose values it changes, all)}: qatkit's Q6_K encoder is ggml's bit for bit, and its scale
    search, run on values it already produced, does not always pick the same scales (60 of 320
    super-blocks on a tiny model, each to the same values: another factoring of d x scale)."""
    from ..formats import FORMATS, decode, encode

    q6 = FORMATS["q6_k"]
    out = {}
    for name, (t, data, shape) in read_gguf_tensors(gguf_path).items():
        if t != q6.ggml_type:
            continue
        values = decode(data, t, shape)
        again = encode(torch.from_numpy(values.copy()), "q6_k")
        a, b = np.asarray(data).view(np.uint8).reshape(-1, q6.block_bytes), again.reshape(-1, q6.block_bytes)
        k = int((a != b).any(-1).sum())
        if k:
            moved = decode(again, t, shape).reshape(-1, q6.block) != values.reshape(-1, q6.block)
            out[name] = (k, int(moved.any(-1).sum()), len(a))
    return out


def _check_out(out: Path) -> None:
    """The export replaces DIR whole: only a new directory, an empty one, or an earlier export."""
    if out.exists() and not out.is_dir():
        raise QatkitError(f"--out {out}: a file is there; give a directory name")
    if out.is_dir() and any(out.iterdir()):
        try:
            ours = "qatkit" in json.loads((out / "config.json").read_text())
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise QatkitError(f"--out {out}: the directory holds other files; the export would replace it, so give a new or empty one")


def requantize_check(hf_dir: Path, qat_gguf: Path, fmt: str, pure: bool = False, f32_gguf: Path | None = None) -> dict:
    """llama.cpp's quantizer on the float GGUF of an HF export (`f32_gguf`: llama.cpp's converter's;
    default: qatkit's F32 exporter's, which writes the converter's tensors) vs the QAT file,
    tensor for tensor: {"tensors", "identical", "differ": {name: (blocks differing, blocks)},
    "values_differ": {name: blocks whose dequantized values differ}}."""
    with tempfile.TemporaryDirectory(prefix="qatkit-") as d:
        if f32_gguf is None:
            source = resolve(hf_dir)
            model, tokenizer = load(source)
            f32_gguf = Path(d) / "f32.gguf"
            export_model(model, tokenizer, source, f32_gguf, "f32", progress=False)
        again = Path(d) / "again.gguf"
        llama_quantize(str(f32_gguf), str(again), ftype=fmt, pure=pure)
        a, b = read_gguf_tensors(qat_gguf), read_gguf_tensors(again)
    if sorted(a) != sorted(b):
        raise QatkitError(f"the re-quantized file has other tensors: {sorted(set(a) ^ set(b))[:4]}")
    from ..formats import BY_GGML_TYPE, decode

    differ, values = {}, {}
    for name, (t, data, shape) in a.items():
        t2, data2, _ = b[name]
        x, y = np.asarray(data).view(np.uint8), np.asarray(data2).view(np.uint8)
        if t != t2 or x.shape != y.shape:
            differ[name] = ("type", t, t2)
        elif not np.array_equal(x, y):
            f = BY_GGML_TYPE[t]
            bx, by = x.reshape(-1, f.block_bytes), y.reshape(-1, f.block_bytes)
            differ[name] = (int((bx != by).any(-1).sum()), len(bx))
            va, vb = (decode(d, t, shape).reshape(-1, f.block) for d in (data, data2))
            values[name] = int((va != vb).any(-1).sum())
    return {"tensors": len(a), "identical": len(a) - len(differ), "differ": differ, "values_differ": values}

"""MODEL -> GGUF file: the `qatkit export` pipeline (load, plan, write) and the PTQ baselines."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .. import QatkitError
from ..models import gguf_meta
from ..models.load import Source, load
from ..plan import FILE_FORMATS, default_plan
from .gguf import gguf_tensors, hf_metadata, write_gguf

log = logging.getLogger(__name__)


def file_metadata(source: Source, model: torch.nn.Module, tokenizer) -> gguf_meta.Metadata:
    """The source GGUF's own metadata, or what the converter writes for an HF source."""
    meta = source.gguf_metadata
    if meta is not None:
        return meta
    return hf_metadata(model, tokenizer, source.arch)


def export_model(
    model: torch.nn.Module,
    tokenizer,
    source: Source,
    out: str | os.PathLike,
    fmt: str,
    pure: bool = False,
    q4_0_scales: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    plan: dict[str, str] | None = None,
) -> dict:
    """Write `model` (the float model or a trained student's float weights) as a GGUF file.
    `plan`: the per-tensor plan the student was prepared with (computed here when absent)."""
    tensors = gguf_tensors(model, source.arch)
    if plan is None:
        plan = default_plan({k: tuple(v.shape) for k, v in tensors.items()}, fmt, pure)
    sizes = write_gguf(out, tensors, plan, file_metadata(source, model, tokenizer), fmt, q4_0_scales, progress)
    return {"path": str(out), "format": fmt, "pure": pure, "plan": plan, "tensor_bytes": sum(sizes.values()), "file_bytes": os.path.getsize(out)}


def float_reference(source: Source, model=None, tokenizer=None, fmt: str = "f32") -> Path:
    """The float teacher as a GGUF (the reference for evaluation and the input of llama.cpp's
    quantizer), cached beside the model's float copy."""
    path = source.cache_dir / f"teacher-{fmt}.gguf"
    if not path.exists():
        if model is None:
            model, tokenizer = load(source)
        export_model(model, tokenizer, source, path, fmt)
    return path


def ptq_llama_cpp(source: Source, out: str | os.PathLike, fmt: str, pure: bool = False, model=None, tokenizer=None) -> dict:
    """llama.cpp's own quantizer on the float teacher (the baseline QAT must beat)."""
    from ..runtime.llamacpp import llama_quantize

    if fmt not in FILE_FORMATS:
        raise QatkitError(f"format {fmt!r}: choose from {', '.join(FILE_FORMATS)}")
    ref = float_reference(source, model, tokenizer)
    llama_quantize(str(ref), str(out), ftype=fmt, pure=pure)
    return {"path": str(out), "format": fmt, "pure": pure, "ptq": "llama.cpp", "source": str(ref), "file_bytes": os.path.getsize(out)}


def export_trained(trained: dict, progress: bool = True) -> dict:
    """Write the student a `train.run.qat_run` returned, through the quantizer it trained with:
    RUN_DIR/qat-<fmt>.gguf, or RUN_DIR/qat-mobile.pte with its tokenizer beside it. Adds the
    file's path ("gguf" or "pte") and size ("file_bytes") to `trained` and returns it."""
    cfg, student, source, tokenizer = trained["config"], trained["student"], trained["source"], trained["tokenizer"]
    run_dir = Path(trained["run_dir"])
    if cfg.qat.fmt == "mobile":
        from .executorch import export_pte

        info = export_pte(student, tokenizer, run_dir / "qat-mobile.pte", max_context=cfg.qat.max_context)
        trained["pte"] = info["path"]
    else:
        from ..prepare import convert

        scales = convert(student, source.arch)
        info = export_model(student, tokenizer, source, run_dir / f"qat-{cfg.qat.fmt}.gguf", cfg.qat.fmt, cfg.qat.pure, q4_0_scales=scales, progress=progress,
                            plan=trained["plan"])  # the plan the student trained under, not recomputed
        trained["gguf"] = info["path"]
    trained["file_bytes"] = info["file_bytes"]
    return trained

"""`qatkit drafter`: QAT of a Gemma 4 MTP drafter against its quantized target, end to end: the
target GGUF read with its file's numbers, the drafter loaded and fake-quantized, trained by the
main loop with the drafter's objective (train/drafter.py), written as a GGUF."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from . import QatkitError
from .export.gguf import export_model, gguf_weight_types
from .models.load import load, resolve
from .prepare import QATConfig, convert, frozen_bytes, linear_weight_types, prepare
from .train.data import default_train_texts, pack
from .train.drafter import check_pair, drafter_loss
from .train.loop import train


def train_drafter(drafter_spec: str, target_gguf: str, run_dir, cfg, texts: list[str] | None = None, draft_steps: int = 2,
                  window: str = "llama.cpp", resume: bool = False, progress: bool = True, fmt: str = "q4_0", seqs: torch.Tensor | None = None) -> dict:
    """QAT of a Gemma 4 MTP drafter against its quantized target: the target is `target_gguf` as
    llama.cpp computes it (its file's numbers; with cfg.faithful also its activation roundings),
    frozen; the drafter is fake-quantized for Q4_0 (llama.cpp's default mix for it) and distilled
    to the target's next-token distribution at every drafting position, `draft_steps` deep, on
    `texts` (default: the default training text) in sequences of cfg.seq_len, or on token
    sequences `seqs` [N, L] (the target's own generations, say). Checkpoints and resume are the
    main trainer's (train.loop). Writes RUN_DIR/qat-drafter-q4_0.gguf; fmt "f32": plain (float)
    training of the drafter, written as RUN_DIR/drafter-f32.gguf."""
    run_dir = Path(run_dir)
    tsrc = resolve(target_gguf)
    if tsrc.arch.name != "gemma4" or tsrc.gguf_metadata is None:
        raise QatkitError(f"{target_gguf}: the target must be a Gemma 4 GGUF file (the quantized model the drafter will serve)")
    target, tokenizer = load(tsrc)
    target_types = gguf_weight_types(target, tsrc.arch, target_gguf)  # (the loaded values are the file's; this says their formats)
    dsrc = resolve(drafter_spec)
    if dsrc.arch.name != "gemma4-assistant":
        raise QatkitError(f"{drafter_spec}: not a Gemma 4 MTP drafter (a {dsrc.arch.name} model)")
    drafter, _ = load(dsrc)
    check_pair(drafter, target)
    if fmt not in ("q4_0", "f32"):
        raise QatkitError(f"drafter format {fmt!r}: q4_0 (QAT) or f32 (float training)")
    plan = prepare(drafter, dsrc.arch, QATConfig(fmt="q4_0")) if fmt == "q4_0" else None
    if seqs is None:
        seqs = pack(tokenizer, texts or default_train_texts(), cfg.seq_len, vocab_size=target.config.get_text_config().vocab_size)
    types = linear_weight_types(drafter, dsrc.arch, plan) if plan else {n: "f32" for n, m in drafter.named_modules() if isinstance(m, torch.nn.Linear)}
    rows = train(drafter, target, seqs, None, cfg, run_dir, resume=resume, progress=progress, weight_types=types,
                 loss_fn=drafter_loss(target_types if cfg.faithful else None, draft_steps, window))
    student = copy.deepcopy(drafter)
    if plan is None:
        info = export_model(drafter, tokenizer, dsrc, run_dir / "drafter-f32.gguf", "f32", progress=progress)
    else:
        scales = convert(drafter, dsrc.arch)
        info = export_model(drafter, tokenizer, dsrc, run_dir / "qat-drafter-q4_0.gguf", "q4_0", q4_0_scales=scales, progress=progress, plan=plan,
                            raw=frozen_bytes(drafter, dsrc.arch))
    return {"rows": rows, "student": student, "plan": plan, "gguf": info["path"], "file_bytes": info["file_bytes"], "target": target, "target_types": target_types}

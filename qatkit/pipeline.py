"""`qatkit run`: the main job, stage by stage.

load -> float reference GGUF -> llama.cpp's PTQ baseline -> QAT (train, export) -> score all three
in llama.cpp on held-out text -> export gap of the trained file -> report.json

Each stage reuses what an earlier run left: the float cache, the reference GGUF and the PTQ file
(cached beside the model), and the training checkpoint with `resume`.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from pathlib import Path

from .eval.gap import export_gap
from .eval.llama import score
from .export.model import float_reference, ptq_llama_cpp
from .models.load import load, resolve
from .train.run import RunConfig, qat_run

log = logging.getLogger(__name__)


def run(cfg: RunConfig, out: Path, text: str, chunks: int, resume: bool = False) -> dict:
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    fmt = cfg.qat.fmt
    log.info("[1/6] loading %s", cfg.model)
    source = resolve(cfg.model)
    model, tokenizer = load(source)
    log.info("[2/6] float reference (F32 GGUF)")
    teacher = float_reference(source, model, tokenizer)
    log.info("[3/6] PTQ baseline: llama.cpp's own quantizer on the float reference")
    ptq = source.cache_dir / f"ptq-llama.cpp-{fmt}{'-pure' if cfg.qat.pure else ''}.gguf"
    if not ptq.exists():
        ptq_llama_cpp(source, ptq, fmt, cfg.qat.pure, model=model, tokenizer=tokenizer)
    log.info("[4/6] quantization-aware training, %d steps", cfg.train.steps)
    trained = qat_run(cfg, out / "train", resume=resume, loaded=(source, model, tokenizer))
    log.info("[5/6] scoring the three files in llama.cpp (%d chunks of held-out text)", chunks)
    files = {"teacher": score(str(teacher), text, max_chunks=chunks)}
    files["teacher"].update(kld=0.0, same_top=100.0)  # the reference itself
    files["ptq"] = score(str(ptq), text, ref_path=str(teacher), max_chunks=chunks)
    files["qat"] = score(trained["gguf"], text, ref_path=str(teacher), max_chunks=chunks)
    log.info("[6/6] export gap: llama.cpp on the QAT file vs the trained student")
    gap = export_gap(trained["student"], source.arch, trained["gguf"], text)
    p_t, p_p, p_q = (files[k]["ppl"] for k in ("teacher", "ptq", "qat"))
    report = {
        "model": cfg.model,
        "format": fmt,
        "files": files,
        "gap_closure": (p_p - p_q) / (p_p - p_t) if p_p != p_t else None,
        "export_gap": gap,
        "steps": cfg.train.steps,
        "tokens_seen": trained["tokens_seen"],
        "train_seconds": trained["train_seconds"],
        "wall_s": round(time.time() - t0, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "config": json.loads(cfg.to_json()),
    }
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / "report.json")
    return report

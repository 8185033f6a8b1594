"""`qatkit run`: the main job, stage by stage.

load -> float reference GGUF -> llama.cpp PTQ baseline -> qatkit export -> score in llama.cpp -> report.json

The QAT stage (train, then export the student) joins between the baseline and the export once
the trainer lands; until then qatkit's file is its own post-training quantization, which must
equal llama.cpp's tensor for tensor.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from .eval.llama import score
from .export.model import export_model, float_reference, ptq_llama_cpp
from .models.load import load, resolve

log = logging.getLogger(__name__)


def run(model_spec: str, out: Path, fmt: str, text: str, chunks: int) -> dict:
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    log.info("[1/4] loading %s", model_spec)
    source = resolve(model_spec)
    model, tokenizer = load(source)
    log.info("[2/4] float reference (F32 GGUF)")
    teacher = float_reference(source, model, tokenizer)
    log.info("[3/4] PTQ baseline with llama.cpp's quantizer, and qatkit's export")
    ptq = source.cache_dir / f"ptq-llama.cpp-{fmt}.gguf"
    if not ptq.exists():
        ptq_llama_cpp(source, ptq, fmt, model=model, tokenizer=tokenizer)
    mine = out / f"qatkit-{fmt}.gguf"
    export_model(model, tokenizer, source, mine, fmt)
    log.info("[4/4] scoring in llama.cpp (%d chunks)", chunks)
    files = {}
    files["teacher"] = score(str(teacher), text, max_chunks=chunks)
    files["teacher"].update(kld=0.0, same_top=100.0)  # the reference itself
    for key, path in (("ptq", ptq), ("qatkit", mine)):
        files[key] = score(str(path), text, ref_path=str(teacher), max_chunks=chunks)
    report = {"model": model_spec, "format": fmt, "files": files, "wall_s": round(time.time() - t0, 1)}
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / "report.json")
    return report
